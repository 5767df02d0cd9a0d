"""``stax.adamw``: AdamW from the shared Adam core, the baseline every stax optimizer extends."""

from __future__ import annotations

from typing import Any, Callable, Optional

import optax

from stax import _validation as V
from stax.codecs.turbo import state_codec_storage
from stax.transforms.adam import scale_by_adam
from stax.transforms.guards import gate_state, gated_chain, nonfinite_guard

__all__ = ["adamw"]


def adamw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    mask: Optional[Any | Callable[[optax.Params], Any]] = None,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    nesterov: bool = False,
    codec: Optional[str] = None,
    min_compress_elements: int = 4096,
    nonfinite: str = "skip",
    dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW (decoupled weight decay) built on :func:`stax.scale_by_adam`.

  .. math::
    p_{t} = p_{t-1} - \eta_t\,(\hat m_t/(\sqrt{\hat v_t+\epsilon_{root}}+\epsilon) + \lambda p_{t-1})

  With ``nonfinite="ignore"`` this is ``optax.adamw`` with the same arguments; the default
  guard only changes steps whose gradients contain NaN/Inf (they are skipped).

  Parameters may be floating-point or complex (complex ones as ``optax.adamw``: ``v`` is the
  EMA of ``|g|²``); integer and bool leaves raise ``TypeError`` at ``init``, naming the leaf.

  Args:
    learning_rate: step size η >= 0 or a schedule (default 1e-3).
    b1: first-moment decay in [0, 1) (default 0.9).
    b2: second-moment decay in [0, 1) (default 0.999).
    eps: denominator term >= 0 (default 1e-8).
    eps_root: term inside the square root >= 0 (default 0).
    weight_decay: decoupled decay λ >= 0, multiplied by the learning rate as in PyTorch and
      optax (default 1e-4, optax's default).
    mask: pytree or callable selecting the leaves that decay (default: all).
    mu_dtype: first-moment dtype, ``None`` or a floating dtype (default: the parameter's).
    nu_dtype: second-moment dtype, ``None`` or a floating dtype (default: the parameter's, but
      float32 for a float16 parameter, :func:`stax.scale_by_adam`). Pass ``jnp.float32`` with
      bfloat16 parameters: in bfloat16, β2 = 0.999 rounds to 1 and v never decays (after a
      50-step burst of ``|g| = 1`` and 3,000 steps of 0.01, the update is 0.044 where float32's
      is 0.195; ``optax.adamw``, which has no such argument, the same).
    nesterov: Nesterov momentum, a bool (default False).
    codec: ``None`` (default: full precision) or ``"stax"`` (4-bit m + 4-bit log v, ≈ 8.75
      bits/param) / ``"factored"`` (4-bit m + Adafactor's row/column v on matrices, ≈ 4.5
      bits/param): the moments of every leaf with at least ``min_compress_elements`` elements
      stored as :func:`stax.turbo_adam` stores them (then real parameters only, and exclusive
      with ``mu_dtype``/``nu_dtype``); see :func:`stax.codecs.state_codec_storage`.
    min_compress_elements: smallest leaf the codec compresses, >= 0 (default 4096).
    dimension_numbers: the matrices the ``"factored"`` codec's v is factored over, any form
      :mod:`stax.layout` takes (default ``None``: :func:`stax.layout.default_dimension_numbers`,
      Flax layouts; stacked ``(L, in, out)`` layers are ``L`` matrices); only with
      ``codec="factored"``. The torch bridge passes the torch layout.
    nonfinite: ``"skip"`` (default), ``"error"``, ``"ignore"`` or ``"zero"``; see
      :func:`stax.nonfinite_guard`.

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> tx = stax.adamw(1e-3, weight_decay=1e-2)
    >>> state = tx.init({"w": jnp.ones(3)})
  """
  mask = V.check_mask("mask", mask)
  V.check_number("learning_rate", learning_rate, low=0.0, allow_schedule=True)
  V.check_number("weight_decay", weight_decay, low=0.0)
  V.check_betas(b1=b1, b2=b2)
  V.check_bool("nesterov", nesterov)
  V.check_dtype("mu_dtype", mu_dtype)
  V.check_dtype("nu_dtype", nu_dtype)
  # gated: on a skipped step the core selects its moments back (a codec's encodings included)
  # and holds its count, and the schedule's count is held by gate_state, so no lax.cond (which
  # copies the state on CPU) is needed; the result is bit-identical to the cond version.
  storage = state_codec_storage(codec, min_compress_elements=min_compress_elements,
                                mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                                dimension_numbers=dimension_numbers)
  core = scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                       nesterov=nesterov, storage=storage)
  tx = gated_chain(
      core,
      gate_state(optax.add_decayed_weights(weight_decay, mask)),
      gate_state(optax.scale_by_learning_rate(learning_rate)),
  )
  # Complex parameters work as in optax.adamw, but a real `mu_dtype` would drop mu's
  # imaginary part, so it refuses them.
  return V.with_param_checks(
      nonfinite_guard(tx, nonfinite, gated=True), optimizer="stax.adamw",
      allow_complex=mu_dtype is None and codec is None,
      complex_note="a real `mu_dtype` or a codec cannot hold a complex first moment; leave "
                   "mu_dtype=None and codec=None for complex parameters")
