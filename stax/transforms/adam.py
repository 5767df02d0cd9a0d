r"""THE Adam moment core: every Adam-family optimizer in stax is built on :func:`scale_by_adam`.

.. math::

  m_t = \beta_{1,t} m_{t-1} + (1-\beta_{1,t}) g_t,\qquad
  v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\qquad
  u_t = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)

The seams later optimizers plug into:

* ``bias_correction`` — how :math:`\hat m, \hat v` are formed:

  - ``"standard"``: :math:`\hat m = m/(1-\beta_1^t)`, :math:`\hat v = v/(1-\beta_2^t)` (Adam,
    ``optax.adam``);
  - ``"debiased"``: optimi's debiased betas :math:`\hat\beta(\beta,t)=\beta(1-\beta^{t-1})/(1-\beta^t)`
    are used *inside* the EMAs, which then are already unbiased (StableAdamW);
  - ``"product"``: for a time-varying :math:`\beta_1`, :math:`\hat m = m/(1-\prod_i\beta_{1,i})`
    with the product kept per leaf in the state (STAM); :math:`\hat v` as ``"standard"``;
  - ``"none"``: no correction.

  ``correction_eps`` is added to both correction denominators of ``"product"`` (STAM's code
  does this); ``"standard"`` uses ``optax.tree.bias_correction`` itself.
* ``b1`` — a number (or traced array / schedule value), or a :class:`Beta1Rule` that returns a
  per-leaf :math:`\beta_1` from the gradient and the previous first moment (STAM's adaptive
  :math:`\beta_1`); the rule's state lives in this transform's state.
* ``storage`` — how m and v are stored (:mod:`stax.codecs`): full precision in ``mu_dtype`` /
  ``nu_dtype`` by default, or any :class:`~stax.codecs.base.MomentStorage` (TurboAdam's
  compressed codecs), possibly chosen per leaf. The core always passes the storage a
  :class:`~stax.codecs.base.StorageStep` context. Stochastic-rounding codecs draw from a key kept
  in the state (``seed``), hashed with the step count and the leaf index, so runs are
  reproducible and checkpoints resume bit-exactly. The storage's ``project(mu, nu)`` gives the
  moments the update uses (identity by default; :mod:`stax.codecs.tensor_rms` reduces v to one
  mean per tensor, STAMLite's denominator).

The arithmetic of one leaf is the pure function :func:`adam_step`; :func:`adam_update` applies it
to a tree through the storage (reading, the :class:`Beta1Rule`, writing) and is shared by
:func:`scale_by_adam` and :func:`stax.scale_by_stable_adam`.

The non-finite gate: with an exact storage and a constant b1, :func:`scale_by_adam` is
gate-aware (:class:`stax.transforms.guards.GateAwareTransformation`): when the extra argument
``nonfinite_ok`` is false each exact moment is selected back element by element in the loop
that would have updated it (one select: the gradient, non-finite or not, never reaches it), and
the step count and ``b1_prod`` are held, so its state is returned unchanged.

Huge gradients. Before the moments are formed, every gradient entry is saturated at
:math:`\pm B` with :math:`B = 2^{e/2-1}` for the moments' dtype of maximum exponent ``e``
(:func:`stax.numerics.square_bound`: :math:`2^{63}\approx 9.2\cdot10^{18}` for float32 and
bfloat16 moments, 128 for float16): an entry beyond it (up to the dtype's maximum, or ±Inf) acts
exactly as ±B, so :math:`g^2` never overflows, m and v stay finite and the update of that entry
is bounded (about :math:`(1-\beta_1)/\sqrt{1-\beta_2}` on a step that dominates the history).
NaN stays NaN (:func:`stax.nonfinite_guard` handles it). Entries inside the bound are used bit for
bit, so ordinary results do not change; a :class:`Beta1Rule` sees the saturated gradient too.

With the defaults this is exactly ``optax.scale_by_adam`` (for gradients below :math:`B`).

References:
  Kingma & Ba, `Adam: A Method for Stochastic Optimization <https://arxiv.org/abs/1412.6980>`_, 2014.
  Wortsman et al., `Stable and low-precision training for large-scale vision-language models
  <https://arxiv.org/abs/2304.13013>`_, 2023 (debiased betas, as in ``torch-optimi``).

Example:
  >>> import jax.numpy as jnp, optax, stax
  >>> tx = optax.chain(stax.scale_by_adam(b1=0.9, b2=0.999), optax.scale(-1e-3))
  >>> params = {"w": jnp.ones(3)}
  >>> state = tx.init(params)
  >>> updates, state = tx.update({"w": jnp.full(3, 0.5)}, state, params)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

from stax import _eager
from stax import _leafwise
from stax import _validation as V
from stax import numerics as num
from stax._trees import conform, flatten_state, unflatten_state
from stax.codecs import rng
from stax.codecs.base import (StorageLike, StorageStep, as_storage, full_precision_storage,
                              read_step_write, resolve_storages,
                              tensor_mean_square)
from stax.transforms.guards import NONFINITE_OK, DeferredGate, gate_aware, gate_value

__all__ = [
    "ScaleByAdamState",
    "Beta1Rule",
    "AdamConfig",
    "AdamStep",
    "adam_config",
    "adam_init",
    "adam_step",
    "adam_update",
    "LeafStep",
    "leaf_step",
    "scale_by_adam",
    "debias_beta",
    "adam_moments",
    "BIAS_CORRECTIONS",
    "StorageStep",
]

BIAS_CORRECTIONS = ("standard", "debiased", "product", "none")


class Beta1Rule(NamedTuple):
  """A per-leaf first-moment decay supplied by another transform (e.g. STAM's adaptive beta1).

  Attributes:
    init: ``params -> rule_state``.
    update: ``(grads, mu, rule_state, count) -> (b1_tree, rule_state)`` where ``mu`` is the
      decoded previous first moment, ``count`` the number of steps taken before this one, and
      ``b1_tree`` has one scalar (or broadcastable array) per leaf. ``grads`` is the
      saturated gradient (each entry clipped to ``±bound``, the bound the step itself uses).
    raw_grads: when True (default False), ``grads`` is instead a tree of ``(g, bound)`` pairs:
      the raw gradient and that bound; the rule bounds what it computes from it (the rules of
      :mod:`stax.transforms.adaptive_beta` bound their means: equal to the saturated
      gradient's wherever every ``|g| <= bound``). Each per-tensor reduction then reads ``g``
      itself rather than a saturated copy that XLA's CPU backend would materialise.
    sq_means: when True (default False), ``update`` returns a third tree: each leaf's
      ``mean(|g|²)`` of this step (a float32 0-d array, bounded at ``2**126``), which the rule
      computes anyway. A storage that keeps one mean of v per tensor
      (:mod:`stax.codecs.tensor_rms`) then forms its new mean from it instead of reducing
      ``g`` once more (bounded again at the storage's ``B²``; equal to the core's own mean up
      to the summation order). STAMLite's rules set it: it saves one read of every gradient.
    stacked: when True (default False), ``b1_tree`` (and the ``sq_means`` tree) is instead one
      float32 vector with an entry per leaf in flatten order, and the rule keeps its state in
      such vectors: its arithmetic runs once over all leaves instead of once per leaf, and the
      state is a few buffers, not one per leaf and statistic (the rules of
      :mod:`stax.transforms.adaptive_beta`; measured at 1M parameters in 65 tensors, in one
      interleaved loop each: a STAMLite step went from 1.93× to 1.28× optax.adamw's, STAM's from
      2.37× to 1.50×; at 16M STAMLite's from 1.32× to 1.09×). The price is compilation: each
      leaf's elementwise passes read their own entry of the vectors, so XLA compiles them as
      distinct kernels (207 against 89 for STAMLite at 1M), which costs what the fewer scalar
      operations save (2.7 s against 2.9).
    probes: when True (default False), ``update`` returns one more output, last: a float32
      scalar probing every raw gradient it was given (0 when every entry is finite, NaN
      otherwise), formed in the pass that computes its statistics. Under ``nonfinite_guard``
      (a :class:`~stax.transforms.guards.DeferredGate`) the core offers it to the gate, which
      then reads those gradients no more; only a ``raw_grads`` rule's probe is offered (a
      saturated gradient is finite). The rules of :mod:`stax.transforms.adaptive_beta` set it.
  """

  init: Callable[[Any], Any]
  update: Callable[[Any, Any, Any, jax.Array], tuple[Any, ...]]
  raw_grads: bool = False
  sq_means: bool = False
  stacked: bool = False
  probes: bool = False


class ScaleByAdamState(NamedTuple):
  """State of :func:`scale_by_adam`.

  Attributes:
    count: int32 scalar, steps taken.
    mu: encoded first moments (full-precision arrays by default).
    nu: encoded second moments.
    b1_prod: for ``bias_correction="product"``, :math:`\\prod_i \\beta_{1,i}` of every leaf as one
      float32 vector (an entry per leaf, flatten order); ``None`` otherwise.
    b1_state: the :class:`Beta1Rule`'s state, or ``None``.
    key: raw ``uint32[2]`` PRNG key for stochastic-rounding storage, or ``None``.
  """

  count: jax.Array
  mu: Any
  nu: Any
  b1_prod: Any = None
  b1_state: Any = None
  key: Any = None


class AdamConfig(NamedTuple):
  """The Adam core's validated configuration (see :func:`scale_by_adam` for the fields)."""

  b1: Any
  b2: Any
  eps: Any
  eps_root: Any
  bias_correction: str
  correction_eps: Any
  nesterov: bool
  storage: StorageLike
  seed: int

  @property
  def rule(self) -> Optional[Beta1Rule]:
    """The :class:`Beta1Rule`, or ``None`` for a constant b1."""
    return self.b1 if isinstance(self.b1, Beta1Rule) else None


class AdamStep(NamedTuple):
  """The result of :func:`adam_step` for one leaf (of :func:`adam_update`: one tree per field).

  Attributes:
    update: the Adam direction :math:`\\hat m/(\\sqrt{\\hat v+\\epsilon_{root}}+\\epsilon)`.
    mu: the new first moment, exact (what the storage is given to write).
    nu: the new second moment, exact.
    nu_used: the second moment the update was formed from (the storage's projection of ``nu``;
      ``nu`` itself by default).
  """

  update: Any
  mu: Any
  nu: Any
  nu_used: Any


def debias_beta(beta: jax.typing.ArrayLike, count: jax.Array) -> jax.Array:
  r"""optimi's debiased decay :math:`\beta(1-\beta^{t-1})/(1-\beta^t)` for step ``count`` = t ≥ 1.

  An EMA run with these decays equals the bias-corrected EMA with constant :math:`\beta`;
  :math:`\hat\beta(\beta, 1) = 0`.
  """
  t = jnp.asarray(count, jnp.float32)
  beta = jnp.asarray(beta, jnp.float32)
  return beta * (1.0 - beta ** (t - 1.0)) / (1.0 - beta ** t)


def adam_config(*args: Any, **kwargs: Any) -> AdamConfig:
  """Validates :func:`scale_by_adam`'s arguments (``ValueError``) and returns them as a record
  (``storage`` defaults to full precision in ``mu_dtype``/``nu_dtype``).

  Takes exactly :func:`scale_by_adam`'s arguments (bound to its signature, so the names and
  defaults are declared once, there).
  """
  bound = inspect.signature(scale_by_adam).bind(*args, **kwargs)
  bound.apply_defaults()
  a = bound.arguments
  b1, b2, eps, eps_root = a["b1"], a["b2"], a["eps"], a["eps_root"]
  bias_correction, nesterov, seed = a["bias_correction"], a["nesterov"], a["seed"]
  correction_eps, storage = a["correction_eps"], a["storage"]
  rule = b1 if isinstance(b1, Beta1Rule) else None
  if rule is None:
    V.check_betas(b1=b1)
  V.check_betas(b2=b2)
  V.check_number("eps", eps, low=0.0)
  V.check_number("eps_root", eps_root, low=0.0)
  V.check_number("correction_eps", correction_eps, low=0.0)
  V.check_choice("bias_correction", bias_correction, BIAS_CORRECTIONS)
  if nesterov and bias_correction != "standard":
    raise ValueError("`nesterov=True` requires bias_correction='standard'.")
  if rule is not None and nesterov:
    raise ValueError("`nesterov=True` is not supported with a Beta1Rule.")
  V.check_int("seed", seed)
  if storage is None:
    storage = full_precision_storage(a["mu_dtype"], a["nu_dtype"])
  return AdamConfig(b1, b2, eps, eps_root, bias_correction, correction_eps, nesterov, storage,
                    seed)


def adam_step(g: jax.Array, mu: jax.Array, nu: jax.Array, b1: Any, count: jax.Array,
              cfg: AdamConfig, *, b1_prod: Any = None, ok: Any = None,
              project: Optional[Callable] = None,
              exact_parts: tuple[bool, bool] = (True, True),
              nu_sq: Optional[jax.Array] = None,
              nu_mean: Optional[jax.Array] = None,
              nu_new: Optional[jax.Array] = None,
              m_scale: Optional[jax.Array] = None,
              v_scale: Optional[jax.Array] = None,
              m_divisor: Optional[jax.Array] = None,
              v_divisor: Optional[jax.Array] = None) -> AdamStep:
  """One leaf's Adam step: a pure function (like torch's functional ``adamw``).

  Args:
    g: the gradient, already saturated (:func:`stax.numerics.saturate`).
    mu: the previous first moment (decoded).
    nu: the previous second moment (decoded).
    b1: this leaf's first-moment decay (``"debiased"`` debiases it and ``cfg.b2`` here).
    count: int32 scalar, steps taken *including* this one (t >= 1).
    cfg: the configuration (b2, eps, eps_root, bias correction, Nesterov).
    b1_prod: for ``"product"``: this leaf's product of the b1s up to this step.
    ok: ``None``, or the non-finite gate (a scalar bool): when false ``mu`` and ``nu`` come
      back unchanged (each exact part selected back; a per-tensor mean's EMA coefficients
      are (0, 1)).
    project: the storage's ``project(mu, nu)`` (default identity).
    exact_parts: with the gate, which moments must come back unchanged by themselves (each
      is selected back on a skipped step); the others are selected by the caller, so their
      possibly non-finite value does not matter (default both).
    nu_sq: ``None`` (default: ``|g|²``), or ``|g|²`` formed elsewhere (bit for bit equal): a
      storage whose ``project`` reduces v gets its own copy (``StorageBase.reduces_nu``).
    nu_mean: ``None`` (default), or ``(means of |g|², stored means of v)`` (pytrees of the
      encoding's layout) for a storage that keeps means of v (``nu_is_mean``: one mean per
      tensor, :mod:`stax.codecs.tensor_rms`; a matrix's row and column means,
      :mod:`stax.codecs.factored`): the new v is then those means' EMAs,
      ``a2·mean(|g|²) + d2·mean_v``, formed on the means — the means of the elementwise EMA up
      to rounding, as STAMLite's seed and Adafactor compute them — instead of reductions over
      the elementwise EMA (with the gate's selects and the saturation inside, that reduction
      made a STAMLite step 1.8× optax.adamw's; 1.5× without it).
    nu_new: ``None`` (default), or the new v already formed: a per-tensor mean of v whose EMA
      :func:`adam_update` formed for every leaf at once (one vector operation instead of a few
      scalar kernels per leaf); used as the new v instead of an EMA here.
    m_scale: ``None`` (default), or the reciprocal of ``"product"``'s divisor of m
      (:func:`product_divisor`), formed for every leaf at once; m is multiplied by it (and
      ``b1_prod`` not read).
    v_scale: ``None`` (default), or the reciprocal of the update's denominator
      (:func:`denominator`) of a per-tensor v, formed for every leaf at once; the update is
      ``m_hat`` times it. (XLA's CPU backend turns a division by a scalar into this product
      with the scalar's reciprocal anyway, one scalar kernel per leaf and divisor: the same
      values.)
  """
  b2 = cfg.b2
  b1_t, b2_t = b1, b2
  if cfg.bias_correction == "debiased":
    b1_t, b2_t = debias_beta(b1, count), debias_beta(b2, count)
  sq = numerics.abs_sq(g) if nu_sq is None else nu_sq
  if ok is not None and cfg.nesterov:  # its update reads g: 0·NaN would reach it
    g = jnp.where(ok, g, jnp.zeros((), g.dtype))
  # With the gate, an exact part is selected back whole on a skipped step (its non-finite
  # gradient never reaches it): one select per element. (As EMA coefficients (0, 1) and a zeroed
  # gradient the gate took three selects and two broadcasts in every moment's loop: 3,560 more
  # HLO instructions on GPT-2 small and 0.4 s of its first step's compile.) A part the caller
  # selects (a codec's encoding) needs neither.
  gate_mu, gate_nu = (ok is not None and exact_parts[0]), (ok is not None and exact_parts[1])
  (a1, d1), (a2, d2) = (1 - b1_t, b1_t), (1 - b2_t, b2_t)
  new_mu = _ema(mu, g, a1, d1).astype(_moment_dtype(mu, g))
  if gate_mu:
    new_mu = _keep_unless(ok, mu, new_mu)
  if nu_new is not None:
    new_nu = jnp.asarray(nu_new).astype(_moment_dtype(nu, g))
  elif nu_mean is not None:
    sq_mean, old_mean = nu_mean
    dtype = _moment_dtype(nu, g)
    if gate_nu:  # a skipped step uses (0, 1) on zeroed means: they stay exactly as they are
      a2, d2 = _ema_coefficients(b2_t, ok)
      sq_mean = jax.tree.map(lambda s: jnp.where(ok, s, jnp.zeros((), s.dtype)), sq_mean)
    new_nu = jax.tree.map(lambda s, o: _ema(o.astype(s.dtype), s, a2, d2).astype(dtype),
                          sq_mean, old_mean)
  else:
    new_nu = _ema(nu, sq, a2, d2).astype(_moment_dtype(nu, g))
    if gate_nu:
      new_nu = _keep_unless(ok, nu, new_nu)

  m, v = (new_mu, new_nu) if project is None else project(new_mu, new_nu)
  if cfg.bias_correction == "standard":
    # optax's own bias correction, so this is bit-identical with optax.scale_by_adam.
    if cfg.nesterov:
      m_hat = (b1 * optax.tree.bias_correction(m, b1, numerics.safe_increment(count))
               + (1 - b1) * optax.tree.bias_correction(g, b1, count))
    elif m_divisor is not None:
      m_hat = m / m_divisor.astype(m.dtype)
    else:
      m_hat = optax.tree.bias_correction(m, b1, count)
  elif cfg.bias_correction == "product":
    if m_scale is None:
      m_hat = m / product_divisor(cfg, b1_prod).astype(m.dtype)
    else:
      m_hat = m * m_scale.astype(m.dtype)
  else:  # "debiased" moments are already unbiased; "none" skips the correction.
    m_hat = m
  if v_scale is None:
    update = m_hat / denominator(cfg, v, count, v_divisor)
  else:
    update = m_hat * v_scale
  return AdamStep(update, new_mu, new_nu, v)


def _ema(old: jax.Array, new: jax.Array, a: Any, d: Any) -> jax.Array:
  """``d·old + a·new``: the EMA of ``new`` with decay ``d`` (``a = 1 − d``), its decayed old
  value the first operand. Written ``a·new + d·old`` (optax's order), with ``d`` an array that
  every leaf shares (StableAdamW's debiased β, a β from ``inject_hyperparams``), XLA's fusion
  gave the first leaf of each shape its operands in another order and compiled that leaf's
  moment kernels a second time (StableAdamW on ResNet-18: 113 kernels, 105 in this order). The
  same values bit for bit: IEEE addition and multiplication are commutative."""
  return d * old + a * new


def _keep_unless(ok: Any, old: jax.Array, new: jax.Array) -> jax.Array:
  """``new`` where the gate ``ok`` holds, else ``old``: ``where(¬ok, old, new)``, the old value
  first for the reason of :func:`_ema` (as ``where(ok, new, old)``, OAdamW's gradient mode on
  GPT-2 small compiled the first layer's moment kernels again: 99 kernels, 95 in this form)."""
  return jnp.where(jnp.logical_not(ok), old, new)


def _ema_coefficients(b: Any, ok: Any) -> tuple[Any, Any]:
  """An EMA's coefficients ``(1 - b, b)`` of the new value and the old; with the gate ``ok``
  false, ``(0, 1)``, so the EMA keeps the old value exactly (``1 - b`` is formed as without the
  gate: in Python for a Python float)."""
  a, d = 1 - b, b
  if ok is not None:
    a, d = jnp.where(ok, a, 0.0), jnp.where(ok, d, 1.0)
  return a, d


def v_divisor(cfg: AdamConfig, count: jax.Array) -> jax.Array:
  """The second moment's bias-correction divisor after ``count`` steps: optax's ``1 - b2**t``
  (``"standard"``, bit for bit ``optax.tree.bias_correction``'s) or ``1 - b2**t +
  correction_eps`` in float32 (``"product"``)."""
  if cfg.bias_correction == "product":
    return 1 - jnp.asarray(cfg.b2, jnp.float32) ** count.astype(jnp.float32) + cfg.correction_eps
  return 1 - _eager.power(cfg.b2, count)


def product_divisor(cfg: AdamConfig, b1_prod: jax.Array) -> jax.Array:
  """The first moment's divisor of ``bias_correction="product"``: ``1 - Πβ1 + correction_eps``
  (float32; one leaf's, or every leaf's as a vector)."""
  return 1 - b1_prod + cfg.correction_eps


def denominator(cfg: AdamConfig, v: jax.Array, count: jax.Array,
                divisor: Optional[jax.Array] = None) -> jax.Array:
  """The update's denominator :math:`\\sqrt{\\hat v + \\epsilon_{root}} + \\epsilon` of the second
  moment ``v`` (the projected one) after ``count`` steps, with ``cfg``'s bias correction
  (``divisor``: :func:`v_divisor`, formed once for every leaf, else formed here)."""
  if cfg.bias_correction in ("standard", "product"):
    divisor = v_divisor(cfg, count) if divisor is None else divisor
    v_hat = v / divisor.astype(v.dtype)
  else:
    v_hat = v
  return jnp.sqrt(v_hat + cfg.eps_root) + cfg.eps


def adam_init(cfg: AdamConfig, params: Any) -> ScaleByAdamState:
  """The initial :class:`ScaleByAdamState` of ``params``."""
  leaves, treedef = jax.tree.flatten(params)
  stores = resolve_storages(cfg.storage, params)
  encoded = [s.init(p) for s, p in zip(stores, leaves)]
  # (a Flax NNX Variable wraps only an encoding of its own shape: _trees.unflatten_state)
  mu = unflatten_state(params, [e[0] for e in encoded])
  nu = unflatten_state(params, [e[1] for e in encoded])
  b1_prod = None
  if cfg.bias_correction == "product":
    b1_prod = jnp.ones([len(leaves)], jnp.float32)
  rule = cfg.rule
  b1_state = rule.init(params) if rule is not None else None
  key = None
  # A per-leaf storage callable may declare ``needs_key``: then the key is kept whatever the
  # leaves, so the state's structure does not depend on the parameters' sizes (as
  # ``optax.tree.map_params`` needs: it inits from a placeholder with no leaves).
  if any(s.needs_key for s in stores) or getattr(cfg.storage, "needs_key", False) is True:
    key = jax.random.key_data(jax.random.PRNGKey(cfg.seed))
  return ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu, b1_prod=b1_prod,
                          b1_state=b1_state, key=key)


class LeafStep(NamedTuple):
  """The core's arithmetic of one leaf as a pure function, for a storage's fused update.

  ``fn(g, mu, nu, *operands) -> AdamStep`` saturates ``g`` (:func:`stax.numerics.saturate` at the
  decoded moments' bound) and runs :func:`adam_step`; every static part of the configuration
  (Python-number hyperparameters, the bias correction, ``project``) is closed over, and every
  array input (the step count, hyperparameters given as arrays, ``b1_prod``, the gate) is in
  ``operands``, so a kernel passes the operands in and calls ``fn`` on one block. Calling the
  record, ``step(g, mu, nu)``, runs ``fn`` with its operands.
  """

  fn: Callable[..., AdamStep]
  operands: tuple

  def __call__(self, g, mu, nu) -> AdamStep:
    return self.fn(g, mu, nu, *self.operands)


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_dynamic(x: Any) -> bool:
  """An array, or a pytree of arrays (a factored v's row and column means): an operand of the
  leaf's step rather than a part of its configuration."""
  leaves = jax.tree.leaves(x)
  return bool(leaves) and all(_is_array(a) for a in leaves)   # a tracer is a jax.Array


def _make_leaf_fn(cfg: AdamConfig, dynamic: tuple, static: tuple, project: Optional[Callable],
                  exact_parts: tuple[bool, bool], reduces_nu: bool,
                  mean_squares: Optional[Callable]) -> Callable[..., AdamStep]:
  """The function of :func:`leaf_step`'s :class:`LeafStep`, for its static configuration."""

  def fn(g, mu, nu, *operands):
    v = dict(static, **dict(zip(dynamic, operands)))
    c = cfg._replace(b2=v["b2"], eps=v["eps"], eps_root=v["eps_root"],
                     correction_eps=v["correction_eps"])
    bound = num.square_bound(mu.dtype, nu.dtype)   # the stored moments' range
    # a float16 moment is computed with in float32 (written back in float16 by its storage):
    # β·old in float16 rounds β to 11 bits and the product to float16's subnormals
    mu, nu = _widen_float16(mu), jax.tree.map(_widen_float16, nu)
    nu_sq, mean_nu = None, None
    if v["nu_new"] is not None:
      pass  # the new per-tensor mean is given (adam_update formed every leaf's at once)
    elif v["nu_mean"] is not None and not jnp.iscomplexobj(g):
      # the means of |g|² of its own copy, bounded after the mean at B² (as the β1 rules bound
      # their statistics: bit for bit the mean of min(|g|², B²) wherever every |g| <= B)
      b2_sq = jnp.asarray(bound * bound, jnp.float32)  # B² is a power of two: exact
      if not g.size:
        sq_mean = jax.tree.map(lambda e: jnp.zeros(jnp.shape(e), jnp.float32), v["nu_mean"])
      elif v["sq_mean"] is not None:  # the β1 rule's mean(|g|²): no second read of g
        sq_mean = jnp.minimum(jnp.asarray(v["sq_mean"], jnp.float32), b2_sq)
      else:
        own, b2_sq = num.independent(g, b2_sq)
        means = (mean_squares or tensor_mean_square)(own)
        sq_mean = jax.tree.map(lambda x: jnp.minimum(x, b2_sq), means)
      mean_nu = (sq_mean, v["nu_mean"])
    elif not jnp.iscomplexobj(g):
      # |saturate(g, B)|² as min(|g|², B²), bit for bit (B² is a power of two: exact), from g
      # itself: the square of the saturated g that the m pass reads was one instruction both
      # passes shared, met first in the m pass, and the first leaf of each shape then took
      # the v pass's operands in another order (that kernel compiled twice). A storage whose
      # projection reduces v gets its own copy of g (``independent``).
      own, b2_sq = num.independent(g, bound * bound) if reduces_nu else (g, bound * bound)
      nu_sq = jnp.minimum(jnp.square(own), jnp.asarray(b2_sq).astype(own.dtype))
    g = num.saturate(g, bound)
    return adam_step(g, mu, nu, v["b1"], v["count"], c, b1_prod=v["b1_prod"], ok=v["ok"],
                     project=project, exact_parts=exact_parts, nu_sq=nu_sq,
                     nu_mean=mean_nu, nu_new=v["nu_new"], m_scale=v["m_scale"],
                     v_scale=v["v_scale"], m_divisor=v["m_divisor"],
                     v_divisor=v["v_divisor"])

  return fn


def leaf_step(cfg: AdamConfig, b1: Any, count: jax.Array, *, b1_prod: Any = None,
              ok: Any = None, project: Optional[Callable] = None,
              exact_parts: tuple[bool, bool] = (True, True),
              reduces_nu: bool = False, nu_mean: Any = None,
              sq_mean: Any = None, mean_squares: Optional[Callable] = None,
              nu_new: Any = None, m_scale: Any = None, v_scale: Any = None,
              m_divisor: Any = None, v_divisor: Any = None) -> LeafStep:
  """The :class:`LeafStep` of one leaf (arguments as :func:`adam_step`'s; ``reduces_nu`` as the
  storage's: v is formed from ``min(|g|², B²)`` of its own copy of ``g``, which equals the
  saturated gradient's ``|g|²`` bit for bit and stays inside XLA's vectorised reduction;
  ``nu_mean``: the stored means of v, for a storage whose ``nu_is_mean``: :func:`adam_step`
  then gets ``(the same means of |g|², nu_mean)``, those of ``|g|²`` from ``mean_squares``
  (the storage's ``nu_mean_squares``; default the tensor mean) on the core's own copy of
  ``g``; ``sq_mean``: a per-tensor ``mean(|g|²)`` that a :class:`Beta1Rule` with ``sq_means``
  computed, used for a 0-d ``nu_mean`` instead of a reduction of its own; ``nu_new``: that
  mean's new value, formed for every leaf at once, and ``m_scale``, ``v_scale`` as
  :func:`adam_step`'s)."""
  named = {"b1": b1, "b2": cfg.b2, "eps": cfg.eps, "eps_root": cfg.eps_root,
           "correction_eps": cfg.correction_eps, "count": count, "b1_prod": b1_prod, "ok": ok,
           "nu_mean": nu_mean, "sq_mean": sq_mean, "nu_new": nu_new, "m_scale": m_scale,
           "v_scale": v_scale, "m_divisor": m_divisor, "v_divisor": v_divisor}
  dynamic = tuple(k for k, v in named.items() if _is_dynamic(v))
  static = tuple((k, v) for k, v in named.items() if k not in dynamic)
  # Traced once per configuration and leaf shape, not once per leaf (stax._leafwise). The
  # hyperparameters are in `named` (arrays among them, as inject_hyperparams and the torch
  # bridge give them, are operands), so the configuration keeps only what is structural.
  structural = cfg._replace(b1=None, b2=None, eps=None, eps_root=None, correction_eps=None,
                            storage=None, seed=0)
  fn = _leafwise.traced_once(_make_leaf_fn, structural, dynamic, static, project, exact_parts,
                             reduces_nu, mean_squares)
  return LeafStep(fn, tuple(named[k] for k in dynamic))


def _shared_read_step_write(storage: Any, g: jax.Array, step: LeafStep, ctx: StorageStep, *,
                            fused: bool = False):
  """:func:`~stax.codecs.base.read_step_write` (``fused``: the storage's ``fused_update``),
  traced once for every leaf of the same shapes and storage
  (:func:`stax._leafwise.traced_once`); the leaf's index is part of the trace's key only for a
  storage that reads it (``uses_leaf_index``)."""
  index = ctx.index if storage.uses_leaf_index else None
  run = _leafwise.traced_once(_make_read_step_write, storage, step.fn, index, ctx.row0, fused)
  return run(g, step.operands, ctx.count, ctx.key, ctx.mu_enc, ctx.nu_enc, ctx.rounding_key,
             ctx.rounding_keys)


def _make_read_step_write(storage: Any, fn: Callable, index: Any, row0: Any,
                          fused: bool) -> Callable:
  def run(g, operands, count, key, mu_enc, nu_enc, rounding_key, rounding_keys):
    ctx = StorageStep(count, index, key, mu_enc, nu_enc, rounding_key, row0, rounding_keys)
    if fused:
      return storage.fused_update(g, LeafStep(fn, operands), ctx)
    return read_step_write(storage, g, LeafStep(fn, operands), ctx)
  return run


def adam_update(cfg: AdamConfig, updates: Any, state: ScaleByAdamState, ok: Any = None, *,
                fuse: bool = False) -> tuple[AdamStep, ScaleByAdamState]:
  """Adam over a tree: reads the moments through the storage, runs :func:`adam_step` per leaf,
  writes the new moments.

  Args:
    cfg: the configuration (:func:`adam_config`).
    updates: the gradients.
    state: the previous state.
    ok: ``None``, or the non-finite gate (a scalar bool): when false the state comes back
      unchanged. Each leaf's storage is resolved here (a per-leaf callable included), so each
      leaf keeps its state by what its storage declares: an exact part is selected back in the
      loop that would have updated it, the encoding of a part that is not exact (a codec, a
      per-tensor mean) by a select of the old one; the count, ``b1_prod`` and a
      :class:`Beta1Rule`'s state are held.
    fuse: let a storage with a ``fused_update`` (and a constant b1) do read, step and write in
      one pass; for such leaves only the ``update`` field of the result is set (the others are
      ``None``). Default False.

  Returns:
    An :class:`AdamStep` whose fields are trees shaped like ``updates``, and the new state.
  """
  rule = cfg.rule
  g_leaves, treedef = jax.tree.flatten(updates)
  # A float16 gradient is computed with in float32 (its update in the dtype it had): in
  # float16, |g|² underflows to 0 below 2.4e-4 and ε = 1e-8 is 0 (FullPrecision's
  # widen_float16). Every other dtype is used as it is (bfloat16 has float32's range).
  in_dtypes = [None if g is None else jnp.dtype(g.dtype) for g in g_leaves]
  g_leaves = [_widen_float16(g) for g in g_leaves]
  n = len(g_leaves)
  stores = resolve_storages(cfg.storage, updates)
  mu_enc, nu_enc = _encoded_leaves(stores, g_leaves, treedef, state)
  count_inc = numerics.safe_increment(state.count)
  read_ctx = lambda i: StorageStep(state.count, i, state.key)

  # First-moment decay, per leaf. A Beta1Rule sees every leaf's decoded previous m and the
  # saturated gradient (±B, as the step itself uses; stax.numerics) before any step runs.
  b1_state, decoded, sq_means = state.b1_state, None, [None] * n
  per_leaf, b1s = {}, None  # per-leaf vectors the leaves' passes read, picked together below
  if rule is not None:
    decoded = [None if g is None else s.read(me, ne, g, read_ctx(i))
               for i, (s, me, ne, g) in enumerate(zip(stores, mu_enc, nu_enc, g_leaves))]
    bounds = [None if g is None else num.square_bound(d[0].dtype, d[1].dtype)
              for g, d in zip(g_leaves, decoded)]
    if rule.raw_grads:
      sat = [None if g is None else (g, b) for g, b in zip(g_leaves, bounds)]
    else:
      sat = [None if g is None else num.saturate(g, b) for g, b in zip(g_leaves, bounds)]
    out = rule.update(jax.tree.unflatten(treedef, sat),
                      jax.tree.unflatten(treedef, [d and d[0] for d in decoded]),
                      state.b1_state, state.count)
    b1_tree, b1_state = out[:2]
    if rule.probes and rule.raw_grads and isinstance(ok, DeferredGate):
      # probes of the raw gradients (a saturated one is finite): the gate reads them no more
      ok.offer(g_leaves, out[-1])
    ok = gate_value(ok)
    if ok is not None:  # a skipped step keeps the rule's state (its per-leaf statistics)
      b1_state = jax.tree.map(lambda n_, o: jnp.where(ok, n_, o), b1_state,
                              conform(state.b1_state, b1_state))
    if rule.stacked:  # one vector, an entry per leaf
      b1_vec = jnp.asarray(b1_tree, jnp.float32)
      per_leaf["b1"] = b1_vec
      if rule.sq_means:
        per_leaf["sq"] = jnp.asarray(out[2], jnp.float32)
    else:
      b1s = treedef.flatten_up_to(b1_tree)
      if rule.sq_means:
        sq_means = treedef.flatten_up_to(out[2])
  else:
    b1s = [cfg.b1] * n
  ok = gate_value(ok)

  b1_prod = state.b1_prod
  if cfg.bias_correction == "product":
    # one product per leaf, kept as a vector: a rule gives one beta1 per leaf (a scalar)
    if rule is not None and rule.stacked:
      new_prod = state.b1_prod * b1_vec
    else:
      new_prod = state.b1_prod * stack_leaf_scalars(b1s)
    b1_prod = new_prod if ok is None else jnp.where(ok, new_prod, state.b1_prod)
    # each leaf's scale of m, formed here for all (no scalar kernel per leaf)
    per_leaf["m_scale"] = 1 / product_divisor(cfg, new_prod)
  # Per-tensor means of v (STAMLite's): their EMAs as one vector, from the rule's mean(|g|²).
  scalar_means = [False] * n
  if "sq" in per_leaf:
    scalar_means = [g is not None and s.nu_is_mean and not jnp.iscomplexobj(g) and g.size > 0
                    and _is_array(ne) and jnp.ndim(ne) == 0
                    for s, g, ne in zip(stores, g_leaves, nu_enc)]
    if any(scalar_means):
      per_leaf["nu_new"] = _mean_emas(cfg, count_inc, ok, per_leaf["sq"], nu_enc, decoded,
                                      scalar_means)
      projections = {stores[i] for i, w in enumerate(scalar_means) if w}
      if len(projections) == 1:  # the update's denominators too (one storage's projection)
        (s,) = projections
        v = jax.vmap(lambda x: s.project(x, x)[1])(per_leaf["nu_new"])
        per_leaf["v_scale"] = 1 / denominator(cfg, v, count_inc)
  # each leaf's entries of them, one pick per leaf (so every leaf's kernels are alike)
  picked = _leafwise.columns(per_leaf)
  nu_news = picked.get("nu_new", [None] * n)
  m_scales = picked.get("m_scale", [None] * n)
  v_scales = picked.get("v_scale", [None] * n)
  b1s = picked.get("b1", b1s)
  sq_means = picked.get("sq", sq_means)

  # The bias corrections' divisors (of m for a shared β1), formed once for every leaf: formed
  # in each leaf's step, XLA's CSE kept the first leaf's and that leaf's kernels took their
  # operands in another order, distinct kernels of the same code (stax.adamw on GPT-2 small:
  # 49 -> 42 kernels).
  m_div = v_div = None
  if rule is None and cfg.bias_correction == "standard" and not cfg.nesterov:
    m_div = 1 - _eager.power(cfg.b1, count_inc)
  if cfg.bias_correction in ("standard", "product"):
    v_div = v_divisor(cfg, count_inc)
  # Each leaf: read → step → write through its storage (stochastic rounding keyed by step and
  # leaf), or the storage's fused update of the three.
  steps, new_mu_enc, new_nu_enc, leaf_keys = [], [], [], None
  for i, (s, g, me, ne) in enumerate(zip(stores, g_leaves, mu_enc, nu_enc)):
    if g is None:
      steps.append(None)
      new_mu_enc.append(me)
      new_nu_enc.append(ne)
      continue
    k = ks = None
    if s.needs_key and state.key is not None:
      if leaf_keys is None:  # every leaf's key and its split at once, each picked (_leafwise)
        leaf_keys = rng.leaf_keys(state.key, state.count, n)
        leaf_pairs = rng.split_key(leaf_keys)
      k, ks = _leafwise.pick(leaf_keys, i), _leafwise.pick(leaf_pairs, i)
    ctx = StorageStep(state.count, i, state.key, me, ne, k, rounding_keys=ks)
    mean_nu = ne if s.nu_is_mean and not jnp.iscomplexobj(g) else None
    # a β1 rule's per-tensor mean(|g|²) serves a per-tensor mean of v (0-d), not other means
    per_tensor = _is_array(mean_nu) and jnp.ndim(mean_nu) == 0
    step = leaf_step(cfg, b1s[i], count_inc, ok=ok, project=s.project, m_scale=m_scales[i],
                     v_scale=v_scales[i] if scalar_means[i] else None,
                     exact_parts=s.exact_parts, reduces_nu=s.reduces_nu, nu_mean=mean_nu,
                     sq_mean=sq_means[i] if per_tensor else None,
                     mean_squares=None if mean_nu is None else s.nu_mean_squares,
                     nu_new=nu_news[i] if scalar_means[i] else None,
                     m_divisor=m_div, v_divisor=v_div)
    if decoded is not None:
      out = step(g, *decoded[i])
      a, c = s.write(out.mu, out.nu, ctx)
    elif fuse and s.fused_update is not None:
      u, a, c = _shared_read_step_write(s, g, step, ctx, fused=True)
      out = AdamStep(u, None, None, None)
    else:
      out, a, c = _shared_read_step_write(s, g, step, ctx)
    if ok is not None:  # a part the storage cannot rewrite unchanged keeps its old encoding
      keep_mu, keep_nu = s.exact_parts
      a = a if keep_mu else _select_tree(ok, a, me)
      # (a new per-tensor mean formed in the vector is selected there)
      c = c if keep_nu or scalar_means[i] else _select_tree(ok, c, ne)
    if in_dtypes[i] == jnp.float16 and getattr(me, "dtype", None) == jnp.float16:
      # float16 in, float16 moment: the update in float16, the dtype it had before widening
      # (a float32 moment or a codec's float32 decode gave float32, and still does)
      out = out._replace(update=out.update.astype(jnp.float16))
    steps.append(out)
    new_mu_enc.append(_cast_like_tree(a, me))
    new_nu_enc.append(_cast_like_tree(c, ne))

  new_state = ScaleByAdamState(
      count=count_inc if ok is None else jnp.where(ok, count_inc, state.count),
      mu=unflatten_state(updates, new_mu_enc),
      nu=unflatten_state(updates, new_nu_enc),
      b1_prod=b1_prod,
      b1_state=b1_state,
      key=state.key,
  )
  fields = [jax.tree.unflatten(treedef, [None if st is None else st[j] for st in steps])
            for j in range(len(AdamStep._fields))]
  return AdamStep(*fields), new_state


def _mean_emas(cfg: AdamConfig, count: jax.Array, ok: Any, sq_means: jax.Array, nu_enc: list,
               decoded: list, which: list) -> jax.Array:
  """The new per-tensor means of v of the leaves ``which`` marks (0 elsewhere), as one float32
  vector: ``a2·min(mean(|g|²), B²) + d2·mean_v`` as :func:`adam_step` forms one leaf's (its
  ``nu_mean``), with ``B`` each leaf's saturation bound and the gate's coefficients (a skipped
  step keeps the old means). One vector operation where each leaf had two scalar kernels and a
  copy of its state."""
  b2_t = debias_beta(cfg.b2, count) if cfg.bias_correction == "debiased" else cfg.b2
  a2, d2 = _ema_coefficients(b2_t, ok)
  b_sq = np.array([num.square_bound(d[0].dtype, d[1].dtype) ** 2 if w else 1.0
                   for d, w in zip(decoded, which)], np.float32)  # powers of two: exact
  old = stack_leaf_scalars([ne if w else 0.0 for ne, w in zip(nu_enc, which)])
  new = _ema(old, jnp.minimum(sq_means, b_sq), a2, d2)
  # a skipped step keeps the stored means (written back through the codec bit for bit: a
  # stored mean is its own encoding), whatever a non-finite mean(|g|²) made of the EMA
  return new if ok is None else jnp.where(ok, new, old)


def scale_by_adam(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    bias_correction: str = "standard",
    correction_eps: Any = 0.0,
    nesterov: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    storage: Optional[StorageLike] = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Adam's bias-corrected moments (the shared Adam core).

  Gradient entries beyond :math:`\pm B` (:func:`stax.numerics.square_bound` of the moments'
  dtypes, :math:`2^{63}` for float32/bfloat16) are saturated to ±B before the moments are formed
  (see the module docstring), so no finite gradient makes a moment or the update non-finite.

  Args:
    b1: first-moment decay in [0, 1) (default 0.9), or a :class:`Beta1Rule` for a per-leaf,
      per-step beta1 (then ``bias_correction`` should be ``"product"``).
    b2: second-moment decay in [0, 1) (default 0.999).
    eps: added to the denominator, >= 0 (default 1e-8).
    eps_root: added inside the square root, >= 0 (default 0).
    bias_correction: one of ``"standard"`` (default), ``"debiased"``, ``"product"``, ``"none"``;
      see the module docstring.
    correction_eps: added to both bias-correction denominators of ``"product"``, >= 0
      (default 0; STAM uses eps).
    nesterov: Nesterov momentum as ``optax.scale_by_adam(nesterov=True)`` (default False; only
      with ``"standard"`` correction).
    mu_dtype: dtype of the stored first moment (default ``None``: the parameter's dtype, as optax).
    nu_dtype: dtype of the stored second moment (default ``None``: the parameter's dtype, but
      float32 for a float16 parameter: in float16, ``(1 − β2)·g²`` rounds to 0 for ``|g|`` below
      7.7e-3, and optax's step of such an entry is ±Inf). A float16 gradient and float16
      moments are computed with in float32 (the update is returned in float16).
    storage: a :class:`~stax.codecs.base.MomentStorage` or a per-leaf callable returning one;
      overrides ``mu_dtype``/``nu_dtype`` (default: full precision).
    seed: seed of the PRNG key kept in the state when the storage rounds stochastically
      (default 0).

  Returns:
    A :class:`~stax.transforms.guards.GateAwareTransformation` (an
    ``optax.GradientTransformationExtraArgs``): its ``update`` accepts the extra argument
    ``nonfinite_ok`` (a scalar bool, from ``nonfinite_guard(gated=True)``), and when it is
    false the state is returned unchanged: each exact moment is selected back in the loop that
    would have updated it, a stored encoding that is not exact (a codec's) is selected back,
    and the step count, ``b1_prod`` and a :class:`Beta1Rule`'s state are held. Each leaf's
    storage decides for itself, so a per-leaf storage callable (TurboAdam's: compressed
    matrices, float32 vectors) is gated as one storage is (a select of the whole new state
    after the core made XLA form an exact vector's new moments twice: for the state and for
    the update).
  """
  cfg = adam_config(**locals())

  def init_fn(params):
    return adam_init(cfg, params)

  def update_fn(updates, state, params=None, **extra_args):
    del params
    step, new_state = adam_update(cfg, updates, state, extra_args.get(NONFINITE_OK), fuse=True)
    return step.update, new_state

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return gate_aware(tx)


def stack_leaf_scalars(values: list) -> jax.Array:
  """One float32 vector of per-leaf scalars (each reshaped to 0-d; Python numbers too), the
  layout of ``b1_prod`` and of a ``stacked`` :class:`Beta1Rule`'s state."""
  if not values:
    return jnp.zeros([0], jnp.float32)
  return jnp.stack([jnp.reshape(jnp.asarray(v, jnp.float32), ()) for v in values])


def _select_tree(ok: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``ok``, else ``old``, leaf by leaf (``old`` in ``new``'s containers)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, conform(old, new))


def _widen_float16(x: Any) -> Any:
  """``x`` in float32 if it is a float16 array, else as it is."""
  return x.astype(jnp.float32) if getattr(x, "dtype", None) == jnp.float16 else x


def _moment_dtype(stored: jax.Array, g: jax.Array):
  """Compute dtype of a moment update: the wider of the stored moment's and the gradient's."""
  return jnp.promote_types(stored.dtype, g.dtype)


def _encoded_leaves(stores, like_leaves, treedef, state):
  """Per-leaf encoded (mu, nu), each in the containers its storage's ``init`` builds (see
  :func:`stax._trees.conform`: Flax NNX hands a codec's NamedTuple back as an ``nnx.State``)."""
  mu_enc = flatten_state(treedef, state.mu)
  nu_enc = flatten_state(treedef, state.nu)
  out_mu, out_nu = [], []
  for s, like, me, ne in zip(stores, like_leaves, mu_enc, nu_enc):
    if like is not None and (not hasattr(me, "dtype") or not hasattr(ne, "dtype")):
      tm, tn = jax.eval_shape(s.init, jax.ShapeDtypeStruct(jnp.shape(like),
                                                           jnp.result_type(like)))
      me, ne = conform(me, tm), conform(ne, tn)
    out_mu.append(me)
    out_nu.append(ne)
  return out_mu, out_nu


def _cast_like_tree(new, old):
  """Keeps every encoded state leaf's dtype stable across updates (jit/cond/donation need it)."""
  return jax.tree.map(lambda n, o: n.astype(o.dtype) if hasattr(o, "dtype") else n, new, old)


def adam_moments(state: ScaleByAdamState, params: Any, storage: Optional[StorageLike] = None,
                 mu_dtype: Any = None, nu_dtype: Any = None) -> tuple[Any, Any]:
  """Decoded (mu, nu) pytrees of a :class:`ScaleByAdamState` (for diagnostics and wrappers).

  ``storage`` must be the one the transform was built with (default: full precision).
  """
  if storage is None:
    storage = full_precision_storage(mu_dtype, nu_dtype)
  leaves, treedef = jax.tree.flatten(params)
  stores = resolve_storages(storage, params)
  mu_enc, nu_enc = _encoded_leaves(stores, leaves, treedef, state)
  pairs = [s.read(me, ne, p, StorageStep(state.count, i, state.key))
           for i, (s, p, me, ne) in enumerate(zip(stores, leaves, mu_enc, nu_enc))]
  return (jax.tree.unflatten(treedef, [p[0] for p in pairs]),
          jax.tree.unflatten(treedef, [p[1] for p in pairs]))
