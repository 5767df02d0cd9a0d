"""Every bridge optimizer through a torch model zoo (the torch half).

Models (``tests/zoo_torch.py``): an ``nn.TransformerEncoderLayer`` (fused ``in_proj_weight``
``(3E, E)``), a conv net (a ``(64, 64, 3, 3)`` kernel, BatchNorm), a tiny random-init Hugging
Face GPT-2 and BERT. Optimizers (``SPECS``): ``torch_bridge.Optimizer(model.named_parameters(),
factory, **kwargs)`` over every entry of ``tests.registry.ALL`` with its kwargs (OAdamW with the
torch layout, SCAO with a 1-step warm-up so it preconditions within the run; the STAC entries
through the ``torch_bridge.STAC`` drop-in, which orders modules itself, with weight decay 1e-2),
and the drop-ins ``STAC, STAM, STAMLite, SCAO, OAdamW, TurboAdam`` at their defaults (SCAO with
the same short warm-up). :func:`test_zoo` checks, for each optimizer × model of ``MATRIX``:

1. the bridged steps equal the pure-JAX steps (``tx.init``/``tx.update``) on the same parameters
   and gradients, each parameter's transform built as the bridge builds it (its own state, the
   tree ``{"layer": {"self_attn": {"in_proj_weight": w}}}`` from its torch dotted name, float
   hyperparameters fed as float32 jit arguments): bit for bit, STAC to a few ulp (``PARITY_TOL``);
2. ``torch.save(opt.state_dict())`` → a new model and optimizer → ``load_state_dict`` →
   continue equals the uninterrupted run bit for bit;
3. every parameter's state costs at most what ``torch.optim.AdamW`` keeps for it.

Then: TurboAdam's documented bits/param whatever the layout; ``transformers.Trainer`` with
bridge optimizers resuming from a checkpoint bit for bit; OAdamW's grouping (``describe()``,
fused q/k/v as three ``E×E`` matrices, no bias to Muon) and its update on ``in_proj_weight``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import stax
import torch_bridge
from tests import zoo_torch as Z
from tests.registry import ALL

STEPS = 4        # optimizer steps per run
SAVE_AFTER = 1   # the checkpoint is taken after this step (0-based); the resumed run does the rest
#: SCAO reaches its preconditioned phase within STEPS (the registry's 20 warm-up steps would not).
SCAO_FAST = dict(warmup_steps=1, precond_freq=1, min_precond_updates=1, blend_steps=1)
#: Per-parameter scalars allowed above AdamW's 2 moments + step (step counts, RNG keys, per-tensor
#: statistics such as STAM's σ²/τ/Πβ1: "plus a few scalars per tensor", README).
SCALAR_ALLOWANCE = 32


# ================================================================================ optimizers
@dataclasses.dataclass(frozen=True)
class Ref:
  """The pure-JAX reference of an optimizer: ``factory(**kwargs)``.

  ``scope="param"``: one state per parameter, each built on the tree the bridge gives it (the
  parameter's dotted torch name split on ``.``); ``scope="tree"``: one state over the whole
  model tree (used for STAC, whose drop-in's per-parameter groups must equal ``stax.stac`` over
  the model with the seed's module order). Float values (and tuples of them) are traced as
  float32 jit arguments, as the bridge feeds them; everything else is static.
  """

  factory: Callable
  kwargs: dict
  scope: str = "param"


@dataclasses.dataclass(frozen=True)
class Spec:
  """One bridge optimizer of the zoo: ``make(model)`` and ``ref(model)`` (a :class:`Ref`)."""

  name: str
  make: Callable[[torch.nn.Module], torch.optim.Optimizer]
  ref: Callable[[torch.nn.Module], Ref]


def _stac_order(model) -> list:
  """The drop-in's module order (registration order, seed's rules), as stax path names."""
  return [m.replace(".", "/") for m, _ in torch_bridge.stac_modules(model)]


def _stac_spec(name, lr, last_n, weight_decay) -> Spec:
  def ref(model):
    k = torch_bridge.STAC(model, lr=lr, last_n_modules=last_n).resolved_last_n_modules
    return Ref(stax.stac, dict(learning_rate=lr, last_n_modules=k, weight_decay=weight_decay,
                               b1=0.9, b2=0.999, eps=1e-8, module_order=_stac_order(model)),
               scope="tree")
  return Spec(name, lambda m: torch_bridge.STAC(m, lr=lr, last_n_modules=last_n,
                                                weight_decay=weight_decay), ref)


def _bridge_filled(factory, kwargs: dict) -> dict:
  """``kwargs`` plus what ``torch_bridge.Optimizer`` fills from the factory's defaults (and then
  traces as float32): ``learning_rate``, ``b1``/``b2``, ``eps``, ``weight_decay``."""
  d = {n: p.default for n, p in inspect.signature(factory).parameters.items()}
  out = dict(kwargs)
  if "learning_rate" not in out and isinstance(d.get("learning_rate"), float):
    out["learning_rate"] = d["learning_rate"]
  if not {"b1", "b2", "betas"} & set(out) and all(isinstance(d.get(k), float)
                                                 for k in ("b1", "b2")):
    out.update(b1=d["b1"], b2=d["b2"])
  for k in ("eps", "weight_decay"):
    if k not in out and isinstance(d.get(k), float):
      out[k] = d[k]
  return out


def TORCH_DIMS(name, x):  # pylint: disable=invalid-name
  """stax's per-leaf form of the bridge's torch layout adapter (pure-JAX side of a comparison)."""
  return torch_bridge.torch_dimension_numbers(np.shape(x), name)


def _registry_spec(entry) -> Spec:
  if entry.factory is stax.stac:
    lr = entry.kwargs["learning_rate"]
    lr = lr if isinstance(lr, float) else 3e-2  # a schedule is torch's scheduler's job
    return _stac_spec(f"STAC[{entry.name}]", lr, entry.kwargs["last_n_modules"], 1e-2)
  kw = dict(entry.kwargs)
  if "dimension_numbers" in inspect.signature(entry.factory).parameters:
    # torch (out, in) weights: the bridge passes its layout to every factory that takes one
    kw["dimension_numbers"] = TORCH_DIMS
  if entry.factory is stax.scao:
    kw.update(SCAO_FAST)
    if "max_precond_dim" in kw:
      # The registry's 8 cuts the contract's tiny matrices into a block grid; on a torch conv
      # (64, 576) it makes 576 blocks, each compiled separately (XLA "Very slow compile", >5
      # min). 64 keeps a few grids (in_proj (96, 32), conv2 (64, 576), GPT-2 c_fc (32, 128)).
      kw["max_precond_dim"] = 64
  return Spec(f"Optimizer[{entry.name}]",
              lambda m: torch_bridge.Optimizer(m.named_parameters(), entry.factory,
                                               static_args=entry.static_args, **kw),
              lambda m: Ref(entry.factory, _bridge_filled(entry.factory, kw)))


def _module_dims(model, embeddings=True):
  """The pure-JAX side of :class:`torch_bridge.ModuleLayout`, which a drop-in built from
  ``model`` uses (GPT-2's ``Conv1D`` weights are ``(in, out)``; OAdamW's: no embedding is a
  matrix)."""
  layout = torch_bridge.ModuleLayout(model, embeddings=embeddings)
  return lambda name, x: layout(np.shape(x), name)


def _dropin(name, cls, factory, ref_kwargs, **make_kwargs) -> Spec:
  """``ref_kwargs``: the pure-JAX factory's arguments, or ``model -> arguments``."""
  return Spec(name, lambda m: cls(m, **make_kwargs),
              lambda m: Ref(factory, ref_kwargs(m) if callable(ref_kwargs) else ref_kwargs))


DROPINS = [
    _stac_spec("STAC", 1e-3, 1, 0.0),
    _dropin("STAM", torch_bridge.STAM, stax.stam, dict(
        learning_rate=1e-3, b1_base=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
        adapt_strength=0.2, tau_decay=0.99, fallback_threshold=100.0)),
    _dropin("STAMLite", torch_bridge.STAMLite, stax.stam_lite, dict(
        learning_rate=1e-3, b1_base=0.9, eps=1e-8, weight_decay=0.01, adapt_strength=0.2,
        moment_decay=0.99, beta1_update_interval=5)),
    _dropin("SCAO", torch_bridge.SCAO, stax.scao, lambda m: dict(
        learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, precond_freq=1,
        epsilon_sparse=0.05, k_min=8, k_max=128, rho=0.999, tau=1.0, warmup_steps=1,
        blend_steps=1, min_precond_updates=1, max_precond_dim=4096,
        dimension_numbers=_module_dims(m)), **SCAO_FAST),
    _dropin("OAdamW", torch_bridge.OAdamW, stax.oadamw, lambda m: dict(
        learning_rate=1e-3, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6, decouple_lr=False,
        max_lr=None, kahan_sum=None, dimension_numbers=_module_dims(m, embeddings=False))),
    _dropin("TurboAdam", torch_bridge.TurboAdam, stax.turbo_adam, lambda m: dict(
        learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, block_size=128,
        v_bits=4, compress_m=True, compress_v=True, min_compress_elements=4096,
        m_block_size=None, seed=305419896, codec="factored", dimension_numbers=_module_dims(m))),
]
SPECS = [_registry_spec(e) for e in ALL] + DROPINS
BY_SPEC = {s.name: s for s in SPECS}

#: Which optimizer × model pairs run. Each pair compiles the bridge step and its pure-JAX
#: reference (2-25 s of CPU each on a 2-core machine; SCAO's the most), so CI runs every
#: optimizer on the encoder, those whose result depends on the layout (STAC's module order,
#: OAdamW's matrices, SCAO's matrix view, TurboAdam's blocks) on the conv net, and those whose
#: result depends on the parameter names or layout (STAC, OAdamW, TurboAdam) on GPT-2 and BERT.
#: (STAM, STAMLite and AdamW are per-element or per-tensor whatever the name or layout; SCAO's
#: compilation on GPT-2 and BERT costs as much as the rest of the HF pairs together.)
#: A registry entry run through ``torch_bridge.Optimizer`` whose drop-in class runs the same
#: factory and mode (through the same ``Optimizer`` machinery) is left to the drop-in.
#: The faithful modes of SCAO and TurboAdam through ``torch_bridge.Optimizer`` (full Kronecker
#: factors, UState codes) are checked against pure JAX on the contract problems by
#: ``tests/test_torch_bridge.py::test_registry_bridge_equals_pure_jax_and_resumes_bit_exact``
#: and against their seeds' packages in test_scao.py / test_turbo_adam.py; on the zoo models
#: their bridge plumbing (layout, units, write-back) is their default mode's, which runs here.
#: ``STAX_ZOO_FULL=1`` runs every optimizer on every model (about 2.5x the CPU time).
FULL = os.environ.get("STAX_ZOO_FULL", "") == "1"
FAITHFUL_PLUMBING_TWIN = {"Optimizer[scao_0.2.4]": "SCAO",
                          "Optimizer[turbo_adam_faithful]": "TurboAdam"}
COVERED_BY_DROPIN = {"Optimizer[scao_lowrank]": "SCAO", "Optimizer[turbo_adam]": "TurboAdam",
                     "Optimizer[stam]": "STAM", "Optimizer[stam_lite]": "STAMLite"}
CONVNET = {"STAC", "STAM", "STAMLite", "SCAO", "OAdamW", "TurboAdam", "STAC[stac]",
           "STAC[stac_sign_only]", "Optimizer[oadamw]", "Optimizer[turbo_adam_faithful]"}
HF = {"STAC", "OAdamW", "TurboAdam"}
MATRIX = {(s.name, z.name) for s in SPECS for z in Z.ZOO
          if FULL or (s.name not in COVERED_BY_DROPIN and s.name not in FAITHFUL_PLUMBING_TWIN
                      and (z.name == "encoder" or (z.name == "convnet" and s.name in CONVNET)
                           or (z.hf and s.name in HF)))}
assert CONVNET | HF | set(COVERED_BY_DROPIN) | set(COVERED_BY_DROPIN.values()) <= set(BY_SPEC)
assert set(FAITHFUL_PLUMBING_TWIN) | set(FAITHFUL_PLUMBING_TWIN.values()) <= set(BY_SPEC)


# ================================================================================ JAX reference
def _tree1(name: str, leaf) -> dict:
  """The tree the bridge hands one parameter's transform.

  ``"a.0.w"`` → ``{"a": {"0": {"w": leaf}}}``.
  """
  for part in reversed(name.split(".")):
    leaf = {part: leaf}
  return leaf


def _get(tree, name: str):
  """The leaf of ``tree`` at a dotted torch name."""
  for part in name.split("."):
    tree = tree[part]
  return tree


def _tree(named: dict) -> dict:
  """The whole model as one nested tree (dotted names split on ``.``)."""
  out: dict = {}
  for name, leaf in named.items():
    node = out
    parts = name.split(".")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = leaf
  return out


def _traced(v) -> bool:
  """Whether the bridge feeds ``v`` as a traced float32 value (floats and tuples of floats)."""
  if isinstance(v, tuple):
    return bool(v) and all(_traced(x) for x in v)
  return isinstance(v, float)


class JaxRef:
  """Runs a :class:`Ref` on ``{torch name: jnp array}`` (jitted init and step)."""

  def __init__(self, ref: Ref, names: list):
    hps = {k: v for k, v in ref.kwargs.items() if _traced(v)}
    static = {k: v for k, v in ref.kwargs.items() if k not in hps}
    self.hps = jax.tree.map(np.float32, hps)

    def make(h):
      return ref.factory(**static, **h)

    if ref.scope == "param":
      def init(params, h):
        tx = make(h)
        return {n: tx.init(_tree1(n, params[n])) for n in names}

      def step(params, grads, states, h):
        tx = make(h)
        newp, news = {}, {}
        for n in names:
          pt = _tree1(n, params[n])
          u, news[n] = tx.update(_tree1(n, grads[n]), states[n], pt)
          newp[n] = _get(optax.apply_updates(pt, u), n)
        return newp, news
    else:
      def init(params, h):
        return make(h).init(_tree(params))

      def step(params, grads, state, h):
        pt = _tree(params)
        u, state = make(h).update(_tree(grads), state, pt)
        newt = optax.apply_updates(pt, u)
        return {n: _get(newt, n) for n in names}, state

    self._init, self._step = jax.jit(init), jax.jit(step)
    self.params = self.state = None

  def start(self, params: dict) -> None:
    """Initial parameters ``{torch name: array}``; the state is initialised on them."""
    self.params, self.state = params, self._init(params, self.hps)

  def step(self, grads: dict) -> dict:
    """One step on ``grads`` ``{torch name: array}``; returns the new parameters."""
    self.params, self.state = self._step(self.params, grads, self.state, self.hps)
    return self.params


def _np(t: torch.Tensor) -> jax.Array:
  """A JAX copy of a tensor (never aliasing torch memory, which the bridge writes into)."""
  return jnp.asarray(np.array(t.detach().float().numpy(), copy=True))


# ================================================================================ the runs
@dataclasses.dataclass
class Run:
  """What one optimizer × model run recorded (computed once per test process)."""

  names: list
  shapes: dict
  diffs: list            # per step: {name: max |bridge - reference| in ulps (_ulps)}
  resumed_equal: dict    # name -> torch.equal(uninterrupted, resumed) after STEPS
  moved_after_save: bool  # some parameter changed after the checkpoint (resume is not vacuous)
  state_bytes: dict      # name -> bytes of its state in opt.state_dict() after STEPS
  param_bytes: dict
  extra: dict


def _save(model, opt) -> bytes:
  buf = io.BytesIO()
  torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
  return buf.getvalue()


def _train_step(zoo, model, opt, t):
  """One optimizer step on batch ``t``; returns the gradients it used (JAX copies)."""
  opt.zero_grad(set_to_none=True)
  zoo.loss(model, zoo.batch(t)).backward()
  grads = {n: _np(p.grad) for n, p in model.named_parameters() if p.grad is not None}
  opt.step()
  return grads


def _ulps(got, want) -> float:
  """max |got - want| in units of the tensor's last place (float32 eps × its largest |want|):
  0 when bit for bit, ~1 for one rounding difference in the largest element."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(float(np.max(np.abs(want), initial=0.0)), np.finfo(np.float32).tiny)
  return float(np.max(np.abs(got - want), initial=0.0)) / (scale * np.finfo(np.float32).eps)


@functools.lru_cache(maxsize=None)
def run(spec_name: str, zoo_name: str) -> Run:
  """Trains ``zoo_name``'s model STEPS steps with ``spec_name`` next to its pure-JAX reference,
  checkpoints after step SAVE_AFTER, resumes a fresh model and optimizer from it to STEPS, and
  records what the checks of :func:`test_zoo` need."""
  spec, zoo = BY_SPEC[spec_name], Z.BY_NAME[zoo_name]
  model = zoo.build(0)
  opt = spec.make(model)
  named = dict(model.named_parameters())
  names = list(named)
  ref = JaxRef(spec.ref(model), names)
  ref.start({n: _np(p) for n, p in named.items()})
  diffs, ck, saved = [], None, None
  for t in range(STEPS):
    grads = _train_step(zoo, model, opt, t)
    assert set(grads) == set(names)
    want = ref.step(grads)
    diffs.append({n: _ulps(_np(named[n]), want[n]) for n in names})
    if t == SAVE_AFTER:
      ck = _save(model, opt)
      saved = {n: p.detach().clone() for n, p in named.items()}
  extra = {}
  if spec.ref(model).factory is stax.scao:
    diag = [stax.scao_diagnostics(ref.state[n]) for n in names]
    extra["scao_phase"] = max(int(d["phase"]) for d in diag)  # 1: preconditioned
    extra["scao_blend"] = max(float(d["blend"]) for d in diag)
  # resume: a fresh model and optimizer from the checkpoint, the remaining steps
  ck = torch.load(io.BytesIO(ck), weights_only=False)
  model_b = zoo.build(1)  # other initial values: everything must come from the checkpoint
  model_b.load_state_dict(ck["model"])
  opt_b = spec.make(model_b)
  opt_b.load_state_dict(ck["opt"])
  for t in range(SAVE_AFTER + 1, STEPS):
    _train_step(zoo, model_b, opt_b, t)
  named_b = dict(model_b.named_parameters())
  resumed = {n: torch.equal(named[n], named_b[n]) for n in names}
  moved = any(not torch.equal(named[n], saved[n]) for n in names)
  sd = opt.state_dict()["state"]
  state_bytes = {n: sum(x.numel() * x.element_size() for x in sd.get(i, {}).values()
                        if isinstance(x, torch.Tensor))
                 for i, n in enumerate(names)}
  return Run(names, {n: tuple(p.shape) for n, p in named.items()}, diffs, resumed, moved,
             state_bytes, {n: Z.param_bytes(p) for n, p in named.items()}, extra)


# ================================================================================ cases
class ParityError(AssertionError):
  """1. The bridged step differs from the pure-JAX step."""


class ResumeError(AssertionError):
  """2. The resumed run differs from the uninterrupted one."""


class StateBytesError(AssertionError):
  """3. A parameter's state costs more than torch AdamW's."""


#: (spec, model) -> (tolerance in ulps of each tensor's largest element, why): pure-JAX parity
#: to a tolerance instead of bit for bit.
_STAC_TOL = (4.0, "the reference is stax.stac over the whole model tree (one partition, one "
             "AdamW-cap bias correction), the drop-in runs each parameter alone: the same math, "
             "fused (and FMA-contracted) differently by XLA, a few ulp")
PARITY_TOL = {(s.name, z.name): _STAC_TOL for s in SPECS if s.name.startswith("STAC")
              for z in Z.ZOO}
#: Library bugs: (spec, model) -> (exception class of the failing check, exact error).
XFAIL: dict = {}
#: Over AdamW's state by design, with the documented reason (the bytes check is not run).
BYTES_BY_DESIGN = {
    "Optimizer[scao_lowrank]": "SCAO keeps Adam's m and v plus low-rank curvature factors "
                               "((m+n)·K + 2K + 3 numbers per matrix, README 'Memory')",
    "Optimizer[scao_0.2.4]": "faithful SCAO keeps Adam's m and v plus full m²+n² Kronecker "
                             "factors (README 'Memory')",
    "SCAO": "SCAO keeps Adam's m and v plus low-rank curvature factors (README 'Memory')",
}


def _cases():
  out = []
  for s in SPECS:
    for z in Z.ZOO:
      if (s.name, z.name) not in MATRIX:
        continue
      marks = []
      if (s.name, z.name) in XFAIL:
        exc, reason = XFAIL[(s.name, z.name)]
        marks.append(pytest.mark.xfail(strict=True, raises=exc, reason=reason))
      out.append(pytest.param(s.name, z.name, marks=marks, id=f"{s.name}-{z.name}"))
  return out


@pytest.mark.parametrize("spec_name,zoo_name", _cases())
def test_zoo(spec_name, zoo_name):
  """One optimizer × one model, three checks (one test item, so one compilation of the step):

  1. each bridged step equals the pure-JAX step of the same factory on the same parameters and
     gradients (bit for bit unless listed in ``PARITY_TOL`` with the reason); SCAO reaches its
     fully blended preconditioned phase;
  2. ``torch.save(state_dict)`` → new model and optimizer → ``load_state_dict`` → continue
     equals the uninterrupted run bit for bit (``torch.equal``);
  3. each parameter's state (``opt.state_dict()['state'][index]`` tensors) costs at most torch
     AdamW's: 2 × the parameter's bytes + a float32 step, plus ``SCALAR_ALLOWANCE`` bytes of
     per-tensor scalars (not run for ``BYTES_BY_DESIGN``).

  A known library bug is an ``xfail(strict=True, raises=<that check's error>)``: another
  check failing still fails the test.
  """
  r = run(spec_name, zoo_name)
  tol = PARITY_TOL.get((spec_name, zoo_name), (0.0, ""))[0]
  for t, d in enumerate(r.diffs):
    bad = {n: v for n, v in d.items() if not v <= tol}
    if bad:
      raise ParityError(f"step {t}: bridge != pure JAX (max |diff| > {tol} ulp): {bad}")
  if "scao_phase" in r.extra and not (r.extra["scao_phase"] == 1
                                      and r.extra["scao_blend"] == 1.0):
    raise ParityError(f"SCAO did not reach its preconditioned phase: {r.extra}")
  bad = [n for n, ok in r.resumed_equal.items() if not ok]
  if bad:
    raise ResumeError(f"resumed run differs from the uninterrupted one for {bad}")
  if not r.moved_after_save:
    raise ResumeError("no parameter changed after the checkpoint: the resume check is vacuous")
  if spec_name not in BYTES_BY_DESIGN:
    over = {n: (r.shapes[n], r.state_bytes[n], 2 * r.param_bytes[n] + 4) for n in r.names
            if r.state_bytes[n] > 2 * r.param_bytes[n] + 4 + SCALAR_ALLOWANCE}
    if over:
      raise StateBytesError(f"state bytes over torch AdamW's (shape, ours, AdamW's): {over}")


# ================================================================================ TurboAdam bits
def _compressed_bits(opt, model, min_elements=4096) -> dict:
  """``{name: (shape, state bits per parameter element)}`` of the parameters TurboAdam
  compresses (``numel >= min_compress_elements``), from ``opt.state_dict()``."""
  sd = opt.state_dict()["state"]
  out = {}
  for i, (n, p) in enumerate(model.named_parameters()):
    if p.numel() >= min_elements:
      nbytes = sum(x.numel() * x.element_size() for x in sd[i].values()
                   if isinstance(x, torch.Tensor))
      out[n] = (tuple(p.shape), 8.0 * nbytes / p.numel())
  return out


TURBO_BITS = {"stax": 8.75, "turboadam-0.2": 6.5}


#: The compressed parameters each model must have at TurboAdam's defaults (>= 4096 elements).
TURBO_COMPRESSED = {
    "convnet": {"conv2.weight"},  # (64, 64, 3, 3): blocks of 128 cannot run along the last axis
    "gpt2": {"transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight",  # (128, 32), (32, 128)
             "transformer.h.0.mlp.c_proj.weight"},  # Conv1D (128, 32): a 32-wide last axis
}


@pytest.mark.parametrize("codec", list(TURBO_BITS))
@pytest.mark.parametrize("zoo_name", list(TURBO_COMPRESSED))
def test_turbo_adam_bits_per_param_whatever_the_layout(zoo_name, codec):
  """TurboAdam's compressed parameters cost their documented bits/param (8.75 for ``"stax"``
  at v_bits=4, block 128, m_block 32; 6.5 for ``"turboadam-0.2"``) within 5 %, for conv kernels
  ``(out, in, kh, kw)`` (last axis 3) and for matrices with a last axis narrower than a block."""
  zoo = Z.BY_NAME[zoo_name]
  model = zoo.build(0)
  opt = torch_bridge.TurboAdam(model, codec=codec)
  _train_step(zoo, model, opt, 0)
  bits = _compressed_bits(opt, model)
  assert TURBO_COMPRESSED[zoo_name] <= set(bits), sorted(bits)
  want = TURBO_BITS[codec]
  off = {n: (s, round(b, 2)) for n, (s, b) in bits.items() if abs(b - want) > 0.05 * want}
  assert not off, f"bits/param (documented {want}): {off}"


# ================================================================================ Trainer
TRAINER_OPTS = {
    "Optimizer[adamw]": lambda m: torch_bridge.Optimizer(m.named_parameters(), stax.adamw,
                                                         lr=1e-3, weight_decay=1e-2),
    "OAdamW": lambda m: torch_bridge.OAdamW(m, lr=1e-3),
    "TurboAdam": lambda m: torch_bridge.TurboAdam(m, lr=1e-3),
}


def _trainer_run(zoo, make_opt, out_dir, resume=None):
  """Trains ``zoo``'s model with ``transformers.Trainer`` for 4 steps (checkpoints every 2),
  optionally resuming from ``resume``; returns the final parameters."""
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  model = zoo.build(0 if resume is None else 1)  # a resumed run gets everything from the files
  opt = make_opt(model)
  sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=1,
                                                       num_training_steps=4)
  kw = dict(output_dir=str(out_dir), max_steps=4, save_steps=2, save_strategy="steps",
            per_device_train_batch_size=4, dataloader_num_workers=0, seed=0, data_seed=0,
            report_to="none", use_cpu=True, disable_tqdm=True, logging_strategy="no")
  if "save_safetensors" in inspect.signature(transformers.TrainingArguments).parameters:
    kw["save_safetensors"] = True  # transformers 4.x (5.x always saves safetensors)
  trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**kw),
                                 train_dataset=Z.TokenDataset(zoo.name),
                                 optimizers=(opt, sched))
  trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
  assert trainer.state.global_step == 4
  return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("opt_name", list(TRAINER_OPTS))
@pytest.mark.parametrize("zoo_name", ["gpt2", "bert"])
def test_trainer_resume_from_checkpoint_is_bit_exact(tmp_path, zoo_name, opt_name):
  """transformers.Trainer with a bridge optimizer and a scheduler: 4 steps with a checkpoint
  every 2; a fresh model + optimizer resumed from checkpoint-2 ends bit for bit where the
  uninterrupted run ended."""
  zoo = Z.BY_NAME[zoo_name]
  full = _trainer_run(zoo, TRAINER_OPTS[opt_name], tmp_path / "a")
  ck = tmp_path / "a" / "checkpoint-2"
  assert (ck / "optimizer.pt").exists() and (ck / "scheduler.pt").exists()
  init = dict(zoo.build(0).named_parameters())
  assert any(not torch.equal(full[n], init[n]) for n in full)  # it trained
  resumed = _trainer_run(zoo, TRAINER_OPTS[opt_name], tmp_path / "b", resume=ck)
  bad = [n for n in full if not torch.equal(full[n], resumed[n])]
  assert not bad, f"resumed Trainer run differs for {bad}"


# ================================================================================ OAdamW rules
_HAS_DESCRIBE = hasattr(torch_bridge.Optimizer, "describe")
_NO_DESCRIBE = ("AttributeError: 'OAdamW' object has no attribute 'describe' (the lead's "
                "opt.describe() API is not in torch_bridge yet)")


def _field(row, key):
  return row[key] if isinstance(row, dict) else getattr(row, key)


def _by_path(rows) -> dict:
  bp = rows.by_path
  return dict(bp() if callable(bp) else bp)


def _encoder_oadamw(**kw):
  model = Z.build_encoder(0)
  return model, torch_bridge.OAdamW(model, **kw)


@pytest.mark.xfail(not _HAS_DESCRIBE, strict=True, reason=_NO_DESCRIBE)
def test_oadamw_describe_rows_attention_and_biases():
  """``opt.describe()``: one row per parameter (torch dotted path, shape, dtype, rule, matrix
  view, storage, state bytes, bits/param); ``in_proj_weight`` ``(3E, E)`` is three ``E×E``
  matrices for Muon; no bias (or other 1-D tensor) goes to Muon."""
  model, opt = _encoder_oadamw()
  _train_step(Z.BY_NAME["encoder"], model, opt, 0)
  rows = opt.describe()
  by = _by_path(rows)
  named = dict(model.named_parameters())
  assert set(by) == set(named)
  sd = opt.state_dict()["state"]
  e = Z.EMBED
  total = 0
  for i, (n, p) in enumerate(named.items()):
    row = by[n]
    assert _field(row, "path") == n
    assert tuple(_field(row, "shape")) == tuple(p.shape)
    assert str(_field(row, "dtype")).replace("torch.", "") == "float32"
    assert _field(row, "rule") in ("adam", "muon"), n  # muon="momentum": Muon or StableAdamW
    # state_bytes: the parameter's own arrays; its step counter is in shared_bytes
    nbytes = sum(x.numel() * x.element_size() for x in sd[i].values())
    total += nbytes
    assert 0 < nbytes - _field(row, "state_bytes") <= SCALAR_ALLOWANCE, (n, nbytes, row)
    assert _field(row, "bits_per_param") == pytest.approx(
        8.0 * _field(row, "state_bytes") / p.numel())
    assert _field(row, "storage")
    if p.ndim < 2:
      assert _field(row, "rule") != "muon", n
      assert _field(row, "matrix") is None, n
  assert sum(_field(r, "state_bytes") for r in rows) + rows.shared_bytes == total
  assert _field(by["layer.self_attn.in_proj_weight"], "rule") == "muon"
  assert tuple(_field(by["layer.self_attn.in_proj_weight"], "matrix")) == (3, e, e)
  assert tuple(_field(by["layer.self_attn.out_proj.weight"], "matrix")) == (1, e, e)
  lin1 = _field(by["layer.linear1.weight"], "matrix")  # (64, 32): one matrix, either orientation
  assert lin1[0] == 1 and sorted(lin1[1:]) == [e, 2 * e]
  assert _field(by["layer.self_attn.in_proj_bias"], "rule") == "adam"


def test_oadamw_orthogonalises_q_k_v_separately():
  """One OAdamW Muon step (``lr=1``, no decay): each ``E×E`` block (q, k, v) of the
  ``in_proj_weight`` update is orthogonal up to the shape scale (its singular values within
  Newton–Schulz's band, max/min < 2, and the three blocks at the same scale). A joint ``3E×E``
  orthogonalisation gives each block max/min of 70-300 on this gradient (measured).

  The loss is on the layer's whole output (128 tokens), so each block's gradient has full rank
  (through a narrow readout it would have rank ~4, and Newton–Schulz keeps zero singular values
  at zero)."""
  model, opt = _encoder_oadamw(lr=1.0, weight_decay=0.0, muon="momentum")
  w = model.layer.self_attn.in_proj_weight
  w0 = w.detach().clone()
  g = torch.Generator().manual_seed(5)
  x = torch.randn(16, 8, Z.EMBED, generator=g)
  y = torch.randn(16, 8, Z.EMBED, generator=g)
  opt.zero_grad()
  torch.nn.functional.mse_loss(model.layer(x), y).backward()
  for blk in torch.chunk(w.grad, 3):  # the premise: full-rank q, k, v gradients
    assert torch.linalg.matrix_rank(blk).item() == Z.EMBED
  opt.step()
  blocks = np.split((w.detach() - w0).numpy().astype(np.float64), 3, axis=0)
  svs = [np.linalg.svd(b, compute_uv=False) for b in blocks]
  cond = [float(s[0] / s[-1]) for s in svs]
  assert max(cond) < 2.0, f"per-block singular value ratios (q, k, v): {cond}"
  tops = [float(s[0]) for s in svs]
  assert max(tops) / min(tops) < 1.25, f"per-block top singular values (q, k, v): {tops}"


def _expected_oadamw_rule(name: str, shape: tuple) -> str:
  """OAdamW's documented default grouping: Muon for every hidden matrix (conv kernels too),
  StableAdamW for 1-D tensors (biases, norms), embeddings and output heads."""
  if len(shape) < 2:
    return "adam"
  if "embeddings" in name or name.split(".")[-2] in ("wte", "wpe", "head", "classifier"):
    return "adam"
  return "muon"


@pytest.mark.xfail(not _HAS_DESCRIBE, strict=True, reason=_NO_DESCRIBE)
@pytest.mark.parametrize("zoo_name", [z.name for z in Z.ZOO])
def test_oadamw_rules_on_every_zoo_model(zoo_name):
  """``OAdamW(model).describe()`` on every zoo model: hidden matrices (attention q/k/v and
  output, FFN, BERT's ``output.dense``, the pooler, conv kernels) go to Muon, each as one matrix
  of the parameter's size, or three ``E×E`` matrices for a fused q/k/v (``in_proj_weight``
  ``(3E, E)``, GPT-2's ``c_attn`` ``(E, 3E)``); biases, norms, embeddings and heads do not."""
  model = Z.BY_NAME[zoo_name].build(0)
  by = _by_path(torch_bridge.OAdamW(model).describe())
  e = Z.EMBED
  wrong = {}
  for n, p in model.named_parameters():
    row, shape = by[n], tuple(p.shape)
    rule, matrix = _field(row, "rule"), _field(row, "matrix")
    if rule != _expected_oadamw_rule(n, shape):
      wrong[n] = (shape, rule)
    elif rule == "muon":
      fused = n.endswith(("in_proj_weight", "c_attn.weight"))
      if (tuple(matrix) != (3, e, e)) if fused else (
          matrix[0] != 1 or matrix[1] * matrix[2] != p.numel()):
        wrong[n] = (shape, rule, matrix)
    elif matrix is not None:
      wrong[n] = (shape, rule, matrix)
  assert not wrong, f"(shape, rule[, matrix]) against OAdamW's documented grouping: {wrong}"


def test_oadamw_gpt2_c_attn_orthogonalised_as_three_matrices():
  """GPT-2's ``Conv1D`` ``c_attn.weight`` ``(E, 3E)`` (q, k, v side by side on the output
  axis) under the bridge's dimension numbers: each ``E×E`` column block of a Muon update is
  orthogonal up to the shape scale (the same factory and tree the bridge builds for it)."""
  name = "transformer.h.0.attn.c_attn.weight"
  e = Z.EMBED
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(e, 3 * e)).astype(np.float32))

  def block(scale):  # a well-conditioned E×E gradient block (singular values in [0.3, 1]·scale)
    q1, _ = np.linalg.qr(rng.normal(size=(e, e)))
    q2, _ = np.linalg.qr(rng.normal(size=(e, e)))
    return scale * (q1 * np.linspace(0.3, 1.0, e)) @ q2

  # q, k, v side by side at different scales (a joint orthogonalisation would shrink q and k)
  g = jnp.asarray(np.concatenate([block(1.0), block(3.0), block(10.0)], axis=1), jnp.float32)
  tx = stax.oadamw(1.0, weight_decay=0.0, dimension_numbers=TORCH_DIMS)
  u, _ = tx.update(_tree1(name, g), tx.init(_tree1(name, w)), _tree1(name, w))
  blocks = np.split(np.asarray(_get(u, name), np.float64), 3, axis=1)
  svs = [np.linalg.svd(b, compute_uv=False) for b in blocks]
  cond = [float(s[0] / s[-1]) for s in svs]
  tops = [float(s[0]) for s in svs]
  assert max(cond) < 2.0 and max(tops) / min(tops) < 1.25, (cond, tops)
