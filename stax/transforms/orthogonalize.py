r"""Newton–Schulz orthogonalisation of matrix-shaped updates, for any layout and any mesh.

Every leaf is seen as a batch of matrices through **dimension numbers**
(:class:`MatrixDimensionNumbers`): the ``reduction_axis`` axes (fan-in) form the rows, the
``output_axis`` axes (fan-out) the columns, and *every other axis is a batch axis*. So

* a Flax ``Dense`` kernel ``(in, out)`` is ``MatrixDimensionNumbers(0, 1)`` (the default for 2-D),
* a torch weight ``(out, in)`` is ``MatrixDimensionNumbers(1, 0)``,
* a Flax conv kernel ``(kh, kw, in, out)`` is ``MatrixDimensionNumbers((0, 1, 2), 3)``
  (:func:`conv_dimension_numbers`), i.e. Muon's flattened ``(kh·kw·in, out)`` filter matrix,
* stacked (scanned) layers ``(L, in, out)`` are ``MatrixDimensionNumbers(1, 2)`` (the default
  for ``ndim >= 3``: leading axes are batch axes), orthogonalised one layer at a time.

A tensor is never handed raw to a matmul: it is transposed and reshaped to ``(batch, m, n)``,
orthogonalised by :func:`stax.kernels.newton_schulz.newton_schulz` (Gram matrix on the smaller
side, Frobenius normalisation, quintic iterations) and reshaped back.

Coefficient presets (``coeffs=``), with the band the output singular values land in after
``ns_steps=5`` for every input singular value :math:`\sigma` with
:math:`\sigma/\|X\|_F \ge 3\cdot10^{-3}` (computed by :func:`singular_value_band`; zero singular
values stay zero):

=================  ===========================================================  ==============
preset             coefficients                                                 band (5 steps)
=================  ===========================================================  ==============
``"jordan"``       Keller Jordan's quintic (3.4445, −4.7750, 2.0315), every step  [0.68, 1.21]
``"polar_express"`` per-iteration minimax set (Amsel et al. 2025), norm × 1.02   [0.85, 1.15]
``"dion"``         per-iteration set of microsoft/dion / optax                  see the function
``"cubic"``        classical Newton–Schulz (1.5, −0.5, 0): converges to exactly 1 slowly
=================  ===========================================================  ==============

A per-iteration preset with fewer rows than ``ns_steps`` repeats its last row; with more, its
first ``ns_steps`` rows are used. ``coeffs`` may also be one ``(a, b, c)`` triple or a sequence
of triples.

Sharding. On arrays sharded over an explicit mesh (inside ``jit`` under ``jax.set_mesh``, or
placed with a ``NamedSharding`` and jitted without a mesh context), ``mode="per_leaf"`` keeps each
matrix sharded along its long axis and all-reduces only the small Gram matrix (a short-axis
sharding is moved there), then reshards back, so row- and column-sharded matrices give the
unsharded result. ``mode="stacked"`` groups same-shape matrices, stacks them, shards the stack
axis over the mesh (padding to a multiple of the device count) so that each device
orthogonalises *whole* matrices with no collective inside the iteration, and reshards back.
Tall matrices are stacked with the wide ones of their transposed shape (fewer groups, less
padding). The matrices of a group are first laid out along one matrix axis, so that the move to
the stack axis and back is an all-to-all: each device receives the matrices it owns, not every
matrix (measured by ``benchmarks/sharded_muon.py``).

``"stacked"`` is the default: it compiles each group's iteration once instead of once per matrix
and, without a mesh, runs as fast (measured on this project's 2-core CPU: OAdamW's first step on
GPT-2 small compiles in 2.4–2.5 s, each matrix read back by :func:`stax._leafwise.unstack`,
against 4.0–4.3 s per leaf, optax.adamw's 0.85–1.0 s; its 16M-parameter step took 344.0 ms
against 344.6 in one interleaved loop); on 8 devices it took 183 ms against 402
(``benchmarks/results/sharded_muon.json``). ``"per_leaf"`` keeps every matrix where its
sharding puts it.

References:
  Jordan et al., `Muon: An optimizer for hidden layers <https://kellerjordan.github.io/posts/muon/>`_, 2024.
  Amsel, Persson, Musco, Gower, `The Polar Express <https://arxiv.org/abs/2505.16932>`_, 2025.
  Liu et al., `Muon is Scalable for LLM Training <https://arxiv.org/abs/2502.16982>`_, 2025.

Example:
  >>> import jax, jax.numpy as jnp, stax
  >>> w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 8, 16))      # Flax conv kernel
  >>> o = stax.orthogonalize(w, dimension_numbers=stax.conv_dimension_numbers(4))
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from optax._src import numerics

from stax import _eager
from stax import _leafwise
from stax import _sharding as _sh
from stax import _validation as V
from stax import numerics as num
from stax import partition
from stax.kernels import newton_schulz as nsk
from stax.kernels._registry import check_implementation
from stax.owners import stack_mesh
from stax.layout import (ATTENTION_IN_PROJECTIONS, ATTENTION_OUT_PROJECTIONS, NEVER_MATRICES,
                         MatrixDimensionNumbers, conv_dimension_numbers, default_dimension_numbers,
                         matrix_shape, resolve_dimension_numbers, resolve_tree)
from stax.layout import check_dimension_numbers as _check_layout_spec
from stax.layout import axes as _axes
from stax.layout import groups as _groups
from stax.layout import is_dimension_numbers as _is_dims
from stax.layout import last_two as _default_dims
from stax.layout import ungroup as _ungroup

__all__ = [
    "MatrixDimensionNumbers", "conv_dimension_numbers", "NS_PRESETS", "ns_coefficients",
    "singular_value_band", "orthogonalize", "orthogonalize_many", "matrix_shape",
    "resolve_dimension_numbers", "default_dimension_numbers", "shape_scale_factor", "ScaleByOrthogonalizationState",
    "scale_by_orthogonalization", "SHAPE_SCALES", "ORTHOGONALIZE_MODES",
]


# --------------------------------------------------------------------------- coefficients
_JORDAN = ((3.4445, -4.7750, 2.0315),)
_POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
_DION = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
         (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))

#: name -> (coefficient rows, Frobenius-norm safety factor)
NS_PRESETS = {
    "jordan": (_JORDAN, 1.0),
    "standard": (_JORDAN, 1.0),
    "polar_express": (_POLAR_EXPRESS, 1.02),
    "dion": (_DION, 1.0),
    "cubic": (((1.5, -0.5, 0.0),), 1.0),
}


def ns_coefficients(coeffs: Any = "jordan", ns_steps: int = 5) -> tuple[tuple, float]:
  """``(rows, norm_scale)``: exactly ``ns_steps`` ``(a, b, c)`` float triples and the preset's
  norm safety factor (1.0 for explicit coefficients)."""
  V.check_int("ns_steps", ns_steps, low=1)
  if isinstance(coeffs, str):
    V.check_choice("coeffs", coeffs, tuple(NS_PRESETS))
    rows, norm_scale = NS_PRESETS[coeffs]
  else:
    arr = np.asarray(coeffs, dtype=np.float64)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2 or arr.shape[-1] != 3 or not np.all(np.isfinite(arr)):
      raise ValueError(f"`coeffs` must be a preset name in {tuple(NS_PRESETS)}, an (a, b, c) "
                       f"triple or a sequence of triples, got {coeffs!r}.")
    rows, norm_scale = tuple(tuple(float(v) for v in r) for r in arr), 1.0
  rows = tuple(rows[min(i, len(rows) - 1)] for i in range(ns_steps))
  return rows, norm_scale


def singular_value_band(coeffs: Any = "jordan", ns_steps: int = 5,
                        sigma_min: float = 3e-3) -> tuple[float, float]:
  """(lo, hi) of the output singular values for every normalised input singular value in
  ``[sigma_min, 1]`` (the composed scalar polynomial evaluated on a fine geometric grid)."""
  rows, norm_scale = ns_coefficients(coeffs, ns_steps)
  s = np.geomspace(sigma_min, 1.0, 200_001) / norm_scale
  for a, b, c in rows:
    s = a * s + b * s ** 3 + c * s ** 5
  return float(s.min()), float(s.max())


# --------------------------------------------------------------------------- layout
def _check_dims(shape, dims):
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(f"cannot orthogonalise a tensor of shape {tuple(shape)} (ndim < 2).")
  try:
    red, out = _axes(dims.reduction_axis, ndim), _axes(dims.output_axis, ndim)
  except TypeError as e:
    raise TypeError(f"`dimension_numbers` must hold ints or tuples of ints, got {dims!r}.") from e
  if not red or not out or len(set(red + out)) != len(red + out):
    raise ValueError(f"`dimension_numbers` {dims!r} must name disjoint, non-empty reduction and "
                     f"output axes of a tensor of shape {tuple(shape)}.")
  return red, out


def _group_spec(spec, groups):
  """Per merged group: the first axis's sharding if it is the only sharded axis, else None;
  plus the (possibly de-sharded) per-axis spec needed before the reshape."""
  new_axis_spec, merged = list(spec), []
  pos = 0
  for g in groups:
    entries = spec[pos:pos + g]
    if g == 0:
      merged.append(None)
    elif all(e is None for e in entries[1:]):
      merged.append(entries[0])
    else:
      for k in range(pos, pos + g):
        new_axis_spec[k] = None
      merged.append(None)
    pos += g
  return tuple(new_axis_spec), tuple(merged)


def _to_matrices(x, dims):
  """``x`` → ``(B, m, n)`` and the inverse function."""
  if _groups(dims) > 1:                 # fused q/k/v: split the output axis, groups are batch
    shape, inner = _ungroup(x.shape, dims)
    if _sh.explicit_spec(x) is not None:
      x = _sh.reshard(x, (), like=_sh.mesh_of(x))
    y, back = _to_matrices(x.reshape(shape), inner)
    return y, lambda z: back(z).reshape(x.shape)
  shape = x.shape
  ndim = x.ndim
  red, out = _check_dims(shape, dims)
  batch = tuple(i for i in range(ndim) if i not in red + out)
  perm = batch + red + out
  inv_perm = tuple(np.argsort(perm))
  bsz, m, n = matrix_shape(shape, dims)
  xt = jnp.transpose(x, perm) if perm != tuple(range(ndim)) else x
  t_shape = xt.shape
  spec = _sh.explicit_spec(xt)
  if spec is None:
    y = xt.reshape(bsz, m, n)

    def back(z):
      z = z.reshape(t_shape)
      return jnp.transpose(z, inv_perm) if perm != tuple(range(ndim)) else z
    return y, back
  axis_spec, merged = _group_spec(spec, (len(batch), len(red), len(out)))
  # Shardings on x's own mesh: a bare PartitionSpec needs `jax.set_mesh` (stax/_sharding.py).
  mesh = _sh.mesh_of(xt)
  if axis_spec != spec:
    xt = _sh.reshard(xt, axis_spec)
  y = xt.reshape((bsz, m, n), out_sharding=_sh.named(mesh, merged))
  orig = _sh.explicit_spec(x)

  def back_sharded(z):
    z = _sh.reshard(z, merged, like=mesh).reshape(t_shape,
                                                   out_sharding=_sh.named(mesh, axis_spec))
    if perm != tuple(range(ndim)):
      z = jnp.transpose(z, inv_perm)
    return _sh.reshard(z, orig, like=mesh)
  return y, back_sharded


# --------------------------------------------------------------------------- functional API
def orthogonalize(x: jax.Array, coeffs: Any = "jordan", ns_steps: int = 5, eps: float = 1e-7,
                  *, dimension_numbers: Any = None, implementation: Optional[str] = None,
                  compute_dtype: Any = jnp.float32) -> jax.Array:
  """Newton–Schulz orthogonalisation of one tensor (see the module docstring).

  Args:
    x: a tensor with ``ndim >= 2``.
    coeffs: preset name or coefficients (default ``"jordan"``).
    ns_steps: iterations >= 1 (default 5).
    eps: added to the Frobenius norm, >= 0 (default 1e-7, Keller Jordan's and the seed's).
    dimension_numbers: :class:`MatrixDimensionNumbers` (default: 2-D ``(0, 1)``, higher rank:
      the last two axes, leading axes batch).
    implementation: ``"xla"``, ``"pallas"``, ``"gram"`` or ``None`` (``"gram"``: the iteration
      on the small Gram matrix for aspect ratios >= 2, else ``"xla"``; the Pallas kernel is
      opt-in; see :mod:`stax.kernels.newton_schulz`).
    compute_dtype: dtype of the iteration (default float32).

  Returns:
    An array of ``x``'s shape, dtype and sharding.
  """
  rows, norm_scale = ns_coefficients(coeffs, ns_steps)
  V.check_number("eps", eps, low=0.0)
  check_implementation("newton_schulz", implementation)
  dims = dimension_numbers if dimension_numbers is not None else _default_dims(x.ndim)
  mats, back = _to_matrices(x, dims)
  y = nsk.newton_schulz(mats, rows, eps=eps, norm_scale=norm_scale,
                        compute_dtype=compute_dtype, implementation=implementation)
  return back(y)


def _orthogonalize_fn(coeffs, ns_steps, eps, dims, implementation, compute_dtype):
  return lambda x: orthogonalize(x, coeffs, ns_steps, eps, dimension_numbers=dims,
                                 implementation=implementation, compute_dtype=compute_dtype)


def orthogonalize_many(xs: Sequence[jax.Array], dims: Sequence[Any], coeffs: Any = "jordan",
                       ns_steps: int = 5, eps: float = 1e-7, *, mode: str = "stacked",
                       implementation: Optional[str] = None,
                       compute_dtype: Any = jnp.float32) -> list[jax.Array]:
  """Orthogonalises several tensors; ``mode="stacked"`` batches same-shape matrices and, under an
  explicit mesh, shards the stack axis so each device orthogonalises whole matrices."""
  V.check_choice("mode", mode, ORTHOGONALIZE_MODES)
  if mode == "per_leaf":
    # traced once per shape and configuration, not per leaf (stax._leafwise.traced_once)
    return [_leafwise.traced_once(_orthogonalize_fn, coeffs, ns_steps, eps, d, implementation,
                                  compute_dtype)(x)
            for x, d in zip(xs, dims)]
  rows, norm_scale = ns_coefficients(coeffs, ns_steps)
  mesh, axes = stack_mesh(xs)
  n_dev = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  ax = (axes if len(axes) > 1 else axes[0]) if axes else None
  groups: dict[tuple, list[int]] = {}
  mats, backs, flipped = [], [], []
  for x, d in zip(xs, dims):
    m, back = _to_matrices(x, d)
    mats.append(m)
    backs.append(back)
  wide = {(m.shape[1:], str(m.dtype)) for m in mats if m.shape[1] <= m.shape[2]}
  for i, m in enumerate(mats):
    # a tall matrix joins the wide ones of its transposed shape where there are such (NS(Xᵀ) =
    # NS(X)ᵀ exactly): fewer groups, less padding. Otherwise it stays as it lies: the Gram
    # iteration orthogonalises a tall matrix without transposing it, and a transposed copy
    # costs a pass and, for a lone matrix, a copy fused into each of its consumers (ResNet-18's
    # step compiled 20 kernels more with every tall conv kernel flipped).
    flip = m.shape[1] > m.shape[2] and ((m.shape[2], m.shape[1]), str(m.dtype)) in wide
    if flip:
      mats[i] = jnp.swapaxes(m, 1, 2)
    flipped.append(flip)
    groups.setdefault((mats[i].shape[1:], str(m.dtype)), []).append(i)
  out: list = [None] * len(xs)
  for (shape, _), idx in groups.items():
    # Every matrix of the group in one layout sharded along a matrix axis (rows where they
    # divide, else columns, else replicated), so stacking moves nothing; then one reshard to
    # the stack axis, which XLA makes an all-to-all: each device receives only the matrices it
    # owns (1/n of the group), not every matrix (an all-gather).
    lay = (None, ax, None) if axes and shape[0] % n_dev == 0 else (
        (None, None, ax) if axes and shape[1] % n_dev == 0 else (None, None, None))
    parts = [_sh.reshard(mats[i], lay, like=mesh) if axes else mats[i] for i in idx]
    pad = (-sum(p.shape[0] for p in parts)) % n_dev
    if pad:
      zeros = jnp.zeros((pad,) + shape, parts[0].dtype)
      parts.append(_sh.reshard(zeros, lay, like=mesh) if axes else zeros)
    stack = jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    if axes:
      stack = _sh.reshard(stack, (ax, None, None), like=mesh)
    res = nsk.newton_schulz(stack, rows, eps=eps, norm_scale=norm_scale,
                            compute_dtype=compute_dtype, implementation=implementation)
    if axes:  # back to the group's matrix-axis layout: the inverse all-to-all
      res = _sh.reshard(res, lay, like=mesh)
    # each matrix back from the stack (stax._leafwise.unstack: one kernel reads any of them)
    for i, r in zip(idx, _leafwise.unstack(res, [mats[i].shape[0] for i in idx])):
      r = backs[i](jnp.swapaxes(r, 1, 2) if flipped[i] else r)
      if axes and _sh.explicit_spec(xs[i]) is None:  # an unsharded input comes back replicated
        r = _sh.reshard(r, (), like=mesh)
      out[i] = r
  return out


# --------------------------------------------------------------------------- shape scale
SHAPE_SCALES = ("match_rms", "original", "none")
ORTHOGONALIZE_MODES = ("per_leaf", "stacked")


def shape_scale_factor(m: int, n: int, rule: str, rms: Any = 0.2):
  """Scale of an orthogonalised ``m×n`` (fan-in × fan-out) update.

  ``"match_rms"``: Moonlight's ``rms·sqrt(max(m, n))`` (update RMS = ``rms`` for every shape,
  so AdamW's learning rate and weight decay carry over); ``"original"``: Keller Jordan's
  ``sqrt(max(1, n/m))``; ``"none"``: 1.
  """
  if rule == "match_rms":
    return rms * math.sqrt(max(m, n))
  if rule == "original":
    return math.sqrt(max(1.0, n / m))
  return 1.0


# --------------------------------------------------------------------------- transform
class ScaleByOrthogonalizationState(NamedTuple):
  """State of :func:`scale_by_orthogonalization`.

  Attributes:
    count: int32 steps taken.
    left: per-leaf cached left multipliers ``(B, k, k)`` (``k = min(m, n)``) when
      ``update_proj_gap > 1``, else ``None`` leaves.
  """

  count: jax.Array
  left: Any


def scale_by_orthogonalization(
    coeffs: Any = "jordan",
    ns_steps: int = 5,
    eps: float = 1e-7,
    *,
    dimension_numbers: Any = None,
    mode: str = "stacked",
    shape_scale: str = "none",
    rms: float = 0.2,
    scale: float = 1.0,
    update_proj_gap: int = 1,
    implementation: Optional[str] = None,
    compute_dtype: Any = jnp.float32,
) -> optax.GradientTransformation:
  r"""Replaces every matrix leaf ``G`` by ``scale · s(m, n) · NS(G)``.

  Args:
    coeffs: preset (``"jordan"`` default, ``"polar_express"``, ``"dion"``, ``"cubic"``) or
      coefficients; see the module docstring.
    ns_steps: iterations >= 1 (default 5).
    eps: Frobenius-norm epsilon >= 0 (default 1e-7).
    dimension_numbers: ``None`` (default layout), a :class:`MatrixDimensionNumbers`, or a callable
      ``(path_name, leaf) -> dims | None`` (``None``: the leaf passes through unchanged).
    mode: ``"stacked"`` (default) or ``"per_leaf"`` (see the module docstring).
    shape_scale: ``"none"`` (default), ``"match_rms"`` or ``"original"``
      (:func:`shape_scale_factor`).
    rms: target RMS for ``"match_rms"`` > 0 (default 0.2, Moonlight).
    scale: extra multiplier >= 0 (default 1).
    update_proj_gap: >= 1 (default 1: orthogonalise every step). With ``k > 1`` the full
      iteration runs on steps 1, k+1, 2k+1, ... and caches its *left multiplier* ``L`` (the
      accumulated polynomial in ``X Xᵀ``, ``k×k`` on the small side, so ``NS(G) = L·G/‖G‖``);
      on the other steps the *current* gradient is orthogonalised approximately as
      ``L_cached·G_t/‖G_t‖``. The current gradient is always used; only the orthogonaliser is
      stale (GaLore's "projection refresh gap" semantics). The seed instead returned the stale
      orthogonalised gradient of an earlier step.
    implementation: ``"xla"``, ``"pallas"``, ``"gram"`` or ``None`` (``"gram"``: the iteration
      on the small Gram matrix for aspect ratios >= 2, else ``"xla"``; the Pallas kernel is
      opt-in; see :mod:`stax.kernels.newton_schulz`).
    compute_dtype: iteration dtype (default float32).
  """
  rows, norm_scale = ns_coefficients(coeffs, ns_steps)
  V.check_number("eps", eps, low=0.0)
  V.check_choice("mode", mode, ORTHOGONALIZE_MODES)
  V.check_choice("shape_scale", shape_scale, SHAPE_SCALES)
  V.check_number("rms", rms, low=0.0, low_inclusive=False)
  V.check_number("scale", scale, low=0.0)
  V.check_int("update_proj_gap", update_proj_gap, low=1)
  check_implementation("newton_schulz", implementation)
  _check_layout_spec(dimension_numbers)

  def init_fn(params):
    left = None
    if update_proj_gap > 1:
      flat, treedef = jax.tree_util.tree_flatten_with_path(params)
      lefts = []
      for (p, x), d in zip(flat, resolve_tree(dimension_numbers, params)):
        if d is None:
          lefts.append(None)
          continue
        b, m, n = matrix_shape(x.shape, d)
        k = min(m, n)
        lefts.append(jnp.zeros((b, k, k), compute_dtype))
      left = jax.tree.unflatten(treedef, lefts)
    return ScaleByOrthogonalizationState(jnp.zeros([], jnp.int32), left)

  def finish(y, x, d):
    _, m, n = matrix_shape(x.shape, d)
    s = shape_scale_factor(m, n, shape_scale, rms) * scale
    return (y * s).astype(x.dtype)

  def update_fn(updates, state, params=None):
    del params
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    xs = [x for _, x in flat]
    dims = resolve_tree(dimension_numbers, updates)
    # (an empty leaf is no matrix: its empty update passes, as optax's Adam gives one)
    idx = [i for i, d in enumerate(dims)
           if d is not None and _is_array(xs[i]) and np.size(xs[i]) > 0]
    out = list(xs)
    new_left = state.left
    if update_proj_gap == 1:
      ys = orthogonalize_many([xs[i] for i in idx], [dims[i] for i in idx], coeffs, ns_steps,
                              eps, mode=mode, implementation=implementation,
                              compute_dtype=compute_dtype) if idx else []
      for i, y in zip(idx, ys):
        out[i] = finish(y, xs[i], dims[i])
    else:
      lefts = treedef.flatten_up_to(state.left)
      refresh = (state.count % update_proj_gap) == 0
      for i in idx:
        x, d = xs[i], dims[i]
        y, lefts[i] = _gap_step(x, d, lefts[i], refresh, rows, eps, norm_scale, compute_dtype)
        out[i] = finish(y, x, d)
      new_left = jax.tree.unflatten(treedef, lefts)
    return (jax.tree.unflatten(treedef, out),
            ScaleByOrthogonalizationState(numerics.safe_increment(state.count), new_left))

  return optax.GradientTransformation(init_fn, update_fn)


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _gap_step(x, d, left, refresh, rows, eps, norm_scale, compute_dtype):
  mats, back = _to_matrices(x, d)
  g = mats.astype(compute_dtype)
  transposed = g.shape[-2] > g.shape[-1]
  if transposed:
    g = jnp.swapaxes(g, -1, -2)

  spec = _sh.explicit_spec(g)
  mesh = _sh.mesh_of(g)
  left_spec = None if spec is None else (tuple(jax.typeof(left).sharding.spec)
                                         + (None,) * 3)[:3]

  def full(_):
    y, new_left = nsk.newton_schulz(g, rows, eps=eps, norm_scale=norm_scale,
                                    compute_dtype=compute_dtype, return_left=True)
    new_left = new_left.astype(left.dtype)
    if spec is not None:  # keep the state's sharding stable across steps
      new_left = _sh.reshard(new_left, left_spec, like=mesh)
    return y, new_left

  def stale(_):
    gg = g if spec is None else _sh.reshard(g, (), like=mesh)
    lft = left if spec is None else _sh.reshard(left, (), like=mesh)
    y = jnp.matmul(lft, num.normalize(gg, eps, norm_scale, axis=(-2, -1)))
    return (y if spec is None else _sh.reshard(y, spec, like=mesh)), left

  y, new_left = _eager.cond(refresh, full, stale, None)
  if transposed:
    y = jnp.swapaxes(y, -1, -2)
  return back(y.astype(x.dtype)), new_left
