r"""Joint (m, v) storages for :func:`stax.turbo_adam`.

* :class:`TurboAdam02Storage`: TurboAdam 0.2.0 exactly — UState m (decoded with the persisted v
  and the previous step's bias corrections) and the 1Q log v, each optional, with the seed's
  counter-hash RNG. It reads the step count, the leaf index and the state key from the context
  the Adam core passes (:class:`stax.codecs.base.StorageStep`): per tensor and step the seeds
  are ``seed_for(rounding_seed, t, 0, leaf_index, stream)`` with ``rounding_seed`` the low
  32-bit word of the state key (``PRNGKey(seed)`` keeps ``seed`` there).
* :func:`turbo_storage`: the per-leaf choice (compress only leaves with at least
  ``min_compress_elements`` elements and rank >= 1; others keep float32 moments). Compressed
  leaves are seen through their row view (:mod:`stax.codecs.row_view`): blocks run along the
  tensor's rows (``(out, in·kh·kw)`` for a torch conv weight), not along a short last axis.
  The ``"stax"`` codec's :class:`~stax.codecs.base.SeparateStorage` keeps its encoded arrays on
  the parameter's sharding (``follow_sharding=True``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from stax import layout
from stax import numerics
from stax.codecs import log_quant as LQ
from stax.codecs import ustate as US
from stax.codecs import _layout as L
from stax.codecs.base import FullPrecision, SeparateStorage, StorageBase
from stax.codecs.block_signed import BlockSignedCodec
from stax.codecs.factored import Factored, factored_layout
from stax.codecs.row_view import RowView
from stax.codecs.rng import counter_uniform, flat_index, seed_for, seed_from_key

__all__ = ["TurboAdam02Storage", "StepScalars", "turbo_storage", "bias_corrections", "CODECS",
           "STATE_CODECS", "state_codec_storage"]

CODECS = ("stax", "turboadam-0.2", "factored")


def bias_corrections(b1, b2, t):
  """float32 ``(1 - b1**t, sqrt(1 - b2**t))`` computed as ``-expm1(t·log1p(b - 1))``.

  Accurate to a few float32 ulps of the double-precision values the seed computes (a plain
  float32 ``1 - b**t`` loses ~1e-5 relative for b2 = 0.999 at small t); a Python-float ``b``
  enters through its double-precision logarithm.
  """
  t = jnp.asarray(t, jnp.float32)
  c1 = -jnp.expm1(t * _log_decay(b1))
  c2 = -jnp.expm1(t * _log_decay(b2))
  return c1, jnp.sqrt(c2)


def _log_decay(b):
  """float32 ``log(b)``: from the Python float itself (in double precision) when ``b`` is one,
  so ``b = 0.999`` gives the seed's ``1 - 0.999**t``, not that of float32(0.999) (1.3e-5 off)."""
  if isinstance(b, (float, int)) and not isinstance(b, bool):
    return jnp.float32(math.log1p(float(b) - 1.0))
  return jnp.log1p(jnp.asarray(b, jnp.float32) - 1.0)


class StepScalars(NamedTuple):
  """float32 scalars of one step of :class:`TurboAdam02Storage`: the bias corrections
  ``(c1, sqrt(c2))`` of the step that wrote the stored state (``c1p``, ``c2p``; ``c2p`` is 1
  before the first step, as the seed's) and of this step (``c1``, ``c2``)."""

  c1p: jax.Array
  c2p: jax.Array
  c1: jax.Array
  c2: jax.Array


@dataclasses.dataclass(frozen=True)
class TurboAdam02Storage(StorageBase):
  """TurboAdam 0.2.0's state for one leaf (see the module docstring).

  ``kernel``: ``None``, or a fused update ``(storage, g, step, ctx) -> (AdamStep, mu_enc,
  nu_enc)`` for leaves with both moments compressed (:mod:`stax.kernels.turbo_step`, plugged in
  by :func:`stax.turbo_adam`); it is this storage's ``fused_update``. The per-block pieces
  :meth:`decode_block` and :meth:`encode_block` are what ``read``/``write`` run on the whole
  tensor and what the kernel runs on one block.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> st = stax.TurboAdam02Storage(compress_m=True, compress_v=True, bits=4, block_size=128,
    ...                              m_block_size=64, step_factor=1.1, b1=0.9, b2=0.999, eps=1e-8)
    >>> mu_enc, nu_enc = st.init(jnp.zeros((2, 128)))
    >>> type(mu_enc).__name__, nu_enc.codes.shape, st.needs_key
    ('UStateM', (2, 64), True)
  """

  compress_m: bool
  compress_v: bool
  bits: int
  block_size: int
  m_block_size: int
  step_factor: Any
  b1: Any
  b2: Any
  eps: Any
  kernel: Optional[Callable] = None
  #: ``(group, first parameter)``: added to the seed's hash indices, ``(group, leaf index)``
  #: (the torch bridge steps each parameter as a one-leaf tree and passes its own position)
  rounding_index: tuple = (0, 0)

  @property
  def needs_key(self) -> bool:
    return bool(self.compress_m or self.compress_v)

  @property
  def fused_update(self) -> Optional[Callable]:
    if self.kernel is None or not (self.compress_m and self.compress_v):
      return None
    return functools.partial(self.kernel, self)

  def init(self, param):
    if self.compress_m:
      mu = US.ustate_init(param, self.m_block_size, self.block_size, float(self.step_factor))
    else:
      mu = jnp.zeros(param.shape, jnp.float32)
    if self.compress_v:
      nu = LQ.log_init(param, self.bits, self.block_size)
    else:
      nu = jnp.zeros(param.shape, jnp.float32)
    return mu, nu

  def scalars(self, count) -> StepScalars:
    """The :class:`StepScalars` of step ``count + 1``."""
    c1p, c2p = bias_corrections(self.b1, self.b2, count)
    c1, c2 = bias_corrections(self.b1, self.b2, count + 1)
    return StepScalars(c1p, jnp.where(count > 0, c2p, 1.0), c1, c2)

  def _denom(self, v, c2):
    return (numerics.divide(numerics.sqrt_rn(jnp.maximum(v, 0.0)), c2)
            + jnp.asarray(self.eps, jnp.float32))

  def m_from_u(self, u, v, sc: StepScalars):
    """m = u·c1p·(√v/c2p + eps): the first moment from the decoded UState ``u`` and ``v``."""
    return u * sc.c1p * self._denom(v, sc.c2p)

  def u_from_m(self, mu, v_p, sc: StepScalars):
    """u = (m/c1)/(√v_p/c2 + eps) with the persisted (re-decoded) ``v_p``: what UState
    encodes."""
    return numerics.div_rn(numerics.divide(mu.astype(jnp.float32), sc.c1),
                           self._denom(v_p, sc.c2))

  def decode_block(self, mu_enc, nu_enc, n: int, sc: StepScalars):
    """(m, v) from the encodings of rows of length ``n``: v decoded, m = u·c1p·(√v/c2p + eps)."""
    v = LQ.log_decode(nu_enc, self.bits, self.block_size, n) if self.compress_v else nu_enc
    if not self.compress_m:
      return mu_enc, v
    u = US.ustate_decode(mu_enc, n, self.m_block_size, self.block_size)
    return self.m_from_u(u, v, sc), v

  def encode_block(self, mu, nu, mu_prev, sc: StepScalars, v_uniform, m_uniform):
    """The new v encoding (``v_uniform``'s stochastic rounding) and, for a compressed m, the
    UState parts ``(codes, means, squared residuals)`` of u = (m/c1)/(√v_p/c2 + eps) with the
    persisted v_p (``None`` otherwise)."""
    if self.compress_v:
      nu_enc = LQ.log_encode(nu, self.bits, self.block_size, v_uniform)
      v_p = LQ.log_decode(nu_enc, self.bits, self.block_size, nu.shape[-1])
    else:
      nu_enc = v_p = nu.astype(jnp.float32)
    if not self.compress_m:
      return nu_enc, None
    u = self.u_from_m(mu, v_p, sc)
    return nu_enc, US.ustate_encode_parts(u, mu_prev, m_uniform, self.m_block_size,
                                          self.block_size)

  def finish_m(self, mu_prev, codes, means, sq_sum, total: int):
    """The new UState m: its next encode step is ``step_factor·sqrt(Σr²/N)`` over the tensor."""
    next_step = jnp.sqrt(numerics.divide(sq_sum, float(total))) * jnp.float32(self.step_factor)
    return US.UStateM(codes, means, mu_prev.encode_step.astype(jnp.float32),
                      next_step.astype(jnp.float32))

  def seeds(self, ctx):
    """uint32 seeds of the m (stream 1) and v (stream 2) rounding of this step and leaf."""
    seed, t = seed_from_key(ctx.key), ctx.count + 1
    group, first = self.rounding_index
    index = first + ctx.index
    return seed_for(seed, t, group, index, 1), seed_for(seed, t, group, index, 2)

  def read(self, mu_enc, nu_enc, like, ctx):
    return self.decode_block(mu_enc, nu_enc, like.shape[-1], self.scalars(ctx.count))

  def write(self, mu, nu, ctx):
    n = mu.shape[-1]
    sc = self.scalars(ctx.count)
    m_seed, v_seed = self.seeds(ctx)
    v_u = m_u = None
    if self.compress_v:
      _, n_pad = LQ._dims(n, self.block_size)
      v_u = counter_uniform(flat_index(nu.shape[:-1] + (n_pad,)), v_seed)
    if self.compress_m:
      nmb = L.num_blocks(n, self.m_block_size)
      m_u = counter_uniform(flat_index(mu.shape[:-1] + (nmb * self.m_block_size,)), m_seed)
    nu_enc, parts = self.encode_block(mu, nu, ctx.mu_enc, sc, v_u, m_u)
    if self.compress_v:
      nu_enc = LQ.LogQuantState(*(L.constrain_like(a, mu) for a in nu_enc))
    if not self.compress_m:
      return mu.astype(jnp.float32), nu_enc
    codes, means, sq = parts
    mu_enc = self.finish_m(ctx.mu_enc, L.constrain_like(codes, mu), L.constrain_like(means, mu),
                           jnp.sum(sq), math.prod(mu.shape))
    return mu_enc, nu_enc


def turbo_storage(codec: str, *, b1, b2, eps, block_size: int, v_bits: int, compress_m: bool,
                  compress_v: bool, min_compress_elements: int, m_block_size: int,
                  m_bits: int = 4, step_factor: float = US.DEFAULT_STEP_FACTOR,
                  kernel: Optional[Callable] = None, dimension_numbers: Any = None,
                  rounding_index: tuple = (0, 0)):
  """The per-leaf storage callable used by :func:`stax.turbo_adam` (``kernel``: the compressed
  leaves' fused update, see :class:`TurboAdam02Storage` and
  :class:`~stax.codecs.base.SeparateStorage`; ``dimension_numbers``: the leaves' matrix layout,
  :mod:`stax.layout`, which the ``"factored"`` codec's v is factored over)."""

  def choose(leaf, dims=_DEFAULT):
    size = 1
    for d in leaf.shape:
      size *= d
    big = len(leaf.shape) >= 1 and size >= min_compress_elements and size > 0
    cm, cv = bool(compress_m and big), bool(compress_v and big)
    if codec == "turboadam-0.2":
      if not (cm or cv):
        return SeparateStorage(FullPrecision(jnp.float32), FullPrecision(jnp.float32))
      return RowView(TurboAdam02Storage(cm, cv, v_bits, block_size, m_block_size, step_factor,
                                        b1, b2, eps, kernel, tuple(rounding_index)), block_size)
    m_codec = BlockSignedCodec(m_bits, m_block_size) if cm else FullPrecision(jnp.float32)
    v_codec = LQ.LogQuantCodec(v_bits, block_size) if cv else FullPrecision(jnp.float32)
    if codec == "factored":
      # v: Adafactor's factored moment over the leaf's own matrices (its layout: stacked
      # (L, in, out) layers are L matrices), else (not a matrix) the 1Q log v. Both codecs see
      # the view the m codec's blocks pad least (a conv kernel: (out, in·kh·kw)); the factored
      # v reshapes it back to the leaf.
      if dims is _DEFAULT:   # a leaf without its path (the tree's are from for_tree)
        dims = layout.pathless_dimension_numbers(dimension_numbers, leaf)
      plan = factored_layout(leaf.shape, dims) if cv else None
      if plan is not None:
        v_codec = Factored(shape=plan[0], axes=plan[1],
                           leaf_shape=tuple(int(d) for d in leaf.shape))
      storage = SeparateStorage(m_codec, v_codec, follow_sharding=True)
      return RowView(storage, m_block_size) if (cm or cv) else storage
    storage = SeparateStorage(m_codec, v_codec, follow_sharding=True, kernel=kernel)
    return RowView(storage, block_size) if (cm or cv) else storage

  def for_tree(tree):
    """Each leaf's storage, the factored codec's from the leaf's dimension numbers."""
    leaves = jax.tree.leaves(tree)
    if codec != "factored":
      return [choose(x) for x in leaves]
    return [choose(x, d) for x, d in zip(leaves, layout.resolve_tree(dimension_numbers, tree))]

  choose.needs_key = bool(compress_m or compress_v)  # some leaves round stochastically
  choose.for_tree = for_tree
  return choose


#: ``choose(leaf)`` without dimension numbers: the leaf's own (its path unknown)
_DEFAULT = object()


STATE_CODECS = ("stax", "factored")


def state_codec_storage(codec: Optional[str], *, min_compress_elements: int = 4096,
                        mu_dtype: Any = None, nu_dtype: Any = None,
                        threshold_used: bool = False, dimension_numbers: Any = None):
  """The per-leaf moment storage behind an Adam-family optimizer's ``codec=`` argument.

  ``None`` gives ``None`` (the core's full-precision moments in ``mu_dtype``/``nu_dtype``);
  ``"stax"`` (signed 4-bit m in blocks of 32 + 4-bit 1Q log v in blocks of 128, ≈ 8.75
  bits/param) or ``"factored"`` (the same m + Adafactor's row/column v on matrices, ≈ 4.5
  bits/param plus ``32(m+n)/(mn)``) stores every leaf with at least ``min_compress_elements``
  elements as :func:`stax.turbo_adam` does; smaller leaves keep float32 moments. The faithful
  ``"turboadam-0.2"`` codec is TurboAdam's own (its UState m is decoded with TurboAdam's bias
  corrections) and is refused here. ``dimension_numbers`` (any form :mod:`stax.layout` takes;
  default ``None``: :func:`stax.layout.default_dimension_numbers`) are the matrices the
  ``"factored"`` codec's v is factored over.

  ``min_compress_elements`` is validated either way (an array, as ``inject_hyperparams`` and the
  torch bridge pass it, only with a codec, where it is structural); with ``codec=None`` a
  non-default value has no effect and gives a ``UserWarning`` unless ``threshold_used`` (another
  part of the optimizer reads it, as OAdamW's low-bit Muon momentum does).

  Raises:
    ValueError: an unknown codec, ``min_compress_elements < 0``, or a codec together with
      ``mu_dtype``/``nu_dtype`` (the codec decides how the moments are stored).

  Example:
    >>> import jax.numpy as jnp, stax
    >>> choose = stax.state_codec_storage("stax", min_compress_elements=256)
    >>> type(choose(jnp.zeros((16, 32)))).__name__, type(choose(jnp.zeros(8))).__name__
    ('RowView', 'SeparateStorage')
    >>> stax.state_codec_storage(None) is None
    True
  """
  import jax
  from stax import _validation as V
  layout.check_dimension_numbers(dimension_numbers)
  if codec is None:
    # inject_hyperparams and the torch bridge pass it as an array (traced or not), which has
    # no effect here either: only a plain Python value is checked
    if not isinstance(min_compress_elements, (jax.Array, jax.core.Tracer)):
      V.check_int("min_compress_elements", min_compress_elements, low=0)
      if not threshold_used:
        V.warn_no_effect("min_compress_elements", min_compress_elements, 4096,
                         "with codec=None (full-precision moments)", stacklevel=4)
    return None
  V.check_int("min_compress_elements", min_compress_elements, low=0)
  if codec == "turboadam-0.2":
    raise ValueError("`codec='turboadam-0.2'` is TurboAdam's faithful storage (its m is decoded "
                     "with TurboAdam's own bias corrections); use stax.turbo_adam for it, or "
                     f"one of {STATE_CODECS} here.")
  V.check_choice("codec", codec, STATE_CODECS + (None,))
  for name, dt in (("mu_dtype", mu_dtype), ("nu_dtype", nu_dtype)):
    if dt is not None:
      raise ValueError(f"`{name}` and `codec` cannot both be set: the codec ({codec!r}) decides "
                       f"how the moments are stored; got {name}={dt!r}.")
  return turbo_storage(codec, b1=None, b2=None, eps=None, block_size=128, v_bits=4,
                       compress_m=True, compress_v=True,
                       min_compress_elements=min_compress_elements, m_block_size=32,
                       dimension_numbers=dimension_numbers)
