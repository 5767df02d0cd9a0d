"""The XLA:CPU floor of each optimizer's step: its minimal program, timed beside it.

XLA's CPU backend fuses no multi-output loops: an elementwise loop writes one array and a
reduction is a loop of its own. So on a CPU a step needs at least one pass per array it writes
(AdamW: m, v, p: three passes, 40 B/param by XLA's count, where a single fused loop would move
28) and one reduction pass per group of per-tensor statistics, each before the passes that use
it. The floor of an optimizer is therefore not its one-pass ideal bytes but the fastest XLA
program with its passes. Each program here is that program, written directly in ``jax.numpy``
with nothing else in it (no guards' state, no codec bookkeeping, no schedules), run as the speed
benchmark runs a step (jitted, parameters and state donated, the same parameter set, median of
the timed calls) in the same process as the optimizer it bounds:

* ``adamw``: the three AdamW passes (``optax.adamw``'s own structure: its program's time over
  its step checks the method, about 1).
* ``adamw+check``: plus the non-finite check (one reduction over g before any state is written;
  the step's coefficients are selected on it): ``stax.adamw``.
* ``adamw+check+stats``: plus one pass computing two statistics of g and a moment
  (:func:`stax.numerics.tiled_means`) that set a per-tensor coefficient before the p pass,
  after the check (statistics of a transformed gradient, as OAdamW's gradient mode has; until
  stop 44 StableAdamW's floor, when its RMS clip read the core's new v after the check).
* ``adamw+stats``: AdamW's passes and one pass computing two statistics of g and m that set β1
  before the m pass, the check's finiteness probe a third output of that pass (STAM: its rule
  reads the raw gradients before anything is written, so the check needs no pass of its own;
  :class:`stax.transforms.guards.DeferredGate`); StableAdamW's pass structure too since stop
  44 (its RMS statistics of g and the stored v, before anything is written, with the probe).
* ``stam_lite`` / ``stam_lite+m``: m and p passes only (v is one number per tensor) and one
  statistics pass over g (STAMLite's rule and its v share it, and the check's probe), or over
  g and m (the SNR rule).
* ``stac``: the check, one sign pass (p, g → p) on the trunk and AdamW's three on the capped
  head.
* ``compressed``: TurboAdam's factored default at its ideal: the check, the new v's row and
  column means of g² (two reductions, outputs of different shapes), the new m's per-32 block
  absmax recomputed from the 4-bit codes and g (a reduction, an integer max of the magnitudes'
  bits: ``stax.numerics.absmax``), the encode pass (codes → codes, the codec's own packing,
  ``stax.codecs.packing``: unpacked whole 32-bit words at a time, packed a byte at a time in
  ``uint8`` since stop 56; until stop 46 the program packed the
  two halves of each row, its own layout, which vectorised better than the codec's byte pairs
  did then and worse than words do; stochastic rounding
  as the codec's, ``floor(pos + u)`` with ``u`` the codec's counter hash of the element's
  index (``stax.codecs.rng.counter_uniform``) and a per-leaf seed from the step count
  (``rng.leaf_keys``), the seeds one vector and each leaf's picked: the codec's m is unbiased
  only with it; until stop 45 the program rounded to nearest, 1.99 → 2.28 s of compile on
  ResNet-18) and the p pass
  dividing by the rank-1 estimate, on each leaf's row view (a conv kernel ``(out, in, kh, kw)``
  as ``(out, in·kh·kw)``); 1-D leaves keep AdamW's float32 moments.

* ``muon``: Muon on the matrices (the momentum pass, five Newton–Schulz iterations of
  the quintic ``a·X + (b·A + c·A²)·X`` on ``X Xᵀ`` of the wider orientation, the p pass; on each
  leaf's row view) and ``adamw+check`` on the other leaves, grouped as
  :func:`stax.oadamw_labels` groups them: OAdamW's structure, for its compile floor.
* ``scao``: ``adamw+check`` on the effective gradients; under one conditional (the warm-up)
  each preconditioned matrix's four m·n·K products with its stored factors; under another
  (the refresh period) each side's subspace iteration: ``qr([U, G·Ω])``, the 2K×2K
  Rayleigh–Ritz matrix and its ``eigh``, the new ``U`` (``K = min(128, min(m, n)//2)``, sides
  above 4096 pass through, as :func:`stax.scao` plans them): SCAO's structure, for its
  compile floor.

Every program with the check skips a non-finite step exactly as the steps it bounds do
(``nonfinite_guard``): each moment, encoding and statistic selected back and the learning rate
0; where a pass's update reads g itself (STAC's sign, TurboAdam's new m in its p pass) that
pass selects per element, as the steps do, since a coefficient of 0 would not do (0·NaN is
NaN). Until stop 44 the programs scaled by 0 instead and would have written NaN on the very
step the check exists for, a few operations per element cheaper than a correct step.

``FLOOR_PROGRAMS`` maps each benchmarked optimizer to its program and a sentence saying why;
``COMPILE_FLOOR_PROGRAMS`` adds the programs only the compile benchmark uses (the speed
benchmark bounds those steps by their flops, and SCAO's by phase).
Run alone: ``python -m benchmarks.floors [--size 16M]`` prints each program's time over
``optax.adamw``'s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

B1, B2, LR, EPS, WD = 0.9, 0.999, 1e-3, 1e-8, 0.01
BLOCK = 32

_CHECK = "the non-finite check (a reduction over g before any state is written)"
_PROBED = "the non-finite check's probe (one more output of that pass)"
_ADAMW = "AdamW's three passes (m, v, then p)"

#: optimizer name -> (program, why its step cannot be faster on XLA:CPU)
FLOOR_PROGRAMS = {
    "optax.adamw": ("adamw", _ADAMW + "; the method's check (program ≈ step)"),
    "stax.adamw": ("adamw+check", f"{_ADAMW} and {_CHECK}"),
    "stax.stac": ("stac", f"one sign pass on the trunk, AdamW's three on the capped head, "
                          f"and {_CHECK}"),
    "stax.stam[seed]": ("adamw+stats", f"{_ADAMW} and one pass over g and m for the two "
                                       f"residual statistics that set β1 before the m pass and "
                                       f"{_PROBED}"),
    "stax.stam[snr]": ("adamw+stats", f"{_ADAMW} and one pass over g and m for the SNR "
                                      f"statistics that set β1 and {_PROBED}"),
    "stax.stam_lite[seed]": ("stam_lite", f"the m and p passes (v is one number per tensor) and "
                                          f"one pass over g for mean(g) and mean(g²) (β1's "
                                          f"statistics and the stored v) and {_PROBED}"),
    "stax.stam_lite[snr]": ("stam_lite+m", f"the m and p passes and one pass over g and m for "
                                           f"the statistics and {_PROBED}"),
    "stax.stable_adamw": ("adamw+stats", f"{_ADAMW} and one pass over g and v for the "
                                         f"per-tensor RMS clip (the new v formed inside it from "
                                         f"the stored one) before any state is written and "
                                         f"{_PROBED}"),
    "stax.turbo_adam": ("compressed", f"{_CHECK}; the new v's row and column means of g² (two "
                                      "reductions); the new m's block absmax (a reduction "
                                      "over g and the codes); the encode pass (its stochastic "
                                      "rounding's counter hash per element) and the p pass"),
    "stax.turbo_adam[turboadam-0.2]": ("compressed", f"its passes as the factored codec's "
                                                     f"(same count), and its log and exps per "
                                                     f"element (transcendentals)"),
    "stax.oadamw": ("adamw+check", "Newton–Schulz's matrix products (flops); the momentum "
                                   "and update passes"),
    "stax.oadamw[gradient]": ("adamw+check", "Newton–Schulz's matrix products (flops); the "
                                             "momentum and update passes"),
}


def _lr(ok):
  """The learning rate, 0 on a skipped step: the p pass then writes p back exactly, as the
  guarded steps do (its other operands, the selected moments, are finite)."""
  import jax.numpy as jnp
  return LR if ok is None else jnp.where(ok, LR, 0.0)


def _adam_leaf(p, m, v, g, a1=1 - B1, d1=B1, a2=1 - B2, d2=B2, scale=1.0, ok=None):
  """AdamW on one leaf; with ``ok``, each moment selected back on a skipped step (as stax's
  gate: one select per moment; a coefficient of 0 would not do, 0·NaN is NaN) and the step's
  learning rate 0."""
  import jax.numpy as jnp
  m_new = d1 * m + a1 * g
  v_new = d2 * v + a2 * g * g
  if ok is not None:
    m_new, v_new = jnp.where(ok, m_new, m), jnp.where(ok, v_new, v)
  p = p - _lr(ok) * (scale * m_new / (jnp.sqrt(v_new) + EPS) + WD * p)
  return p, m_new, v_new


def _stats(g, s, probe=False):
  """Two statistics of (g, s) in one pass, as the optimizers compute theirs; with ``probe``
  a third output of the pass, the finiteness probe ``sum(g - g)`` (STAM's rules')."""
  import jax.numpy as jnp
  from stax import numerics as num
  fns = (lambda g, s: jnp.square(g - s), lambda g, s: jnp.abs(g - s))
  if probe:
    fns += (num.total(lambda g, s: g - g),)
  return num.tiled_means(num.independent(g, s), *fns)


def _stats_probed(g, s):
  return _stats(g, s, probe=True)


def _probed_ok(probes):
  """The gate from the statistics pass's probes (0 for finite gradients, NaN otherwise),
  materialised as the guard materialises its check."""
  import jax
  import jax.numpy as jnp
  flag = jnp.isfinite(sum(probes[1:], probes[0]))
  return jax.lax.cond(flag, lambda: jnp.array(True), lambda: jnp.array(False))


def _once(fn):
  """``fn`` traced once per shape of its arguments and inlined (as the optimizers' per-leaf
  steps are, :func:`stax._leafwise.traced_once`): the same program, its first step's trace no
  longer per leaf."""
  from stax import _leafwise
  return _leafwise.shared_trace(fn)


def _stats_leaf(p, m, v, g, ok):
  """AdamW on one leaf with a coefficient from two statistics of (g, m) (StableAdamW's
  floor: the statistics after the check)."""
  import jax.numpy as jnp
  ms, ma = _stats(g, m)
  b1 = jnp.clip(B1 * (1 - 0.2 * ms / (ms + ma * ma + 1e-8)), 0.72, B1)
  return _adam_leaf(p, m, v, g, 1 - b1, b1, ok=ok)


def _beta1_leaf(p, m, v, g, ms, ma, ok):
  """AdamW on one leaf with β1 from its two statistics (STAM's floor, after every leaf's
  statistics pass gave the gate its probes)."""
  import jax.numpy as jnp
  b1 = jnp.clip(B1 * (1 - 0.2 * ms / (ms + ma * ma + 1e-8)), 0.72, B1)
  return _adam_leaf(p, m, v, g, 1 - b1, b1, ok=ok)


def _stam_lite_stats(m, g, snr=False):
  """STAMLite's statistics pass on one leaf, the check's probe a third (fourth) output."""
  import jax.numpy as jnp
  from stax import numerics as num
  probe = num.total(lambda g, m: g - g)
  if snr:
    return num.tiled_means(num.independent(g, m), lambda g, m: g, lambda g, m: jnp.square(g),
                           lambda g, m: jnp.square(g - m), probe)
  gm, gq, pr = num.tiled_means(num.independent(g, jnp.zeros([], g.dtype)), lambda g, m: g,
                               lambda g, m: jnp.square(g), probe)
  return gm, gq, gq, pr


def _stam_lite_leaf(p, m, v, g, gm, gq, rq, ok):
  """STAMLite's floor on one leaf after its statistics pass: the m and p passes."""
  import jax.numpy as jnp
  b1 = jnp.clip(B1 * (1 - 0.2 * rq / (gq + gm * gm + 1e-8)), 0.72, B1)
  v = jnp.where(ok, B2 * v + (1 - B2) * gq, v)  # v: one number per tensor
  m_new = jnp.where(ok, b1 * m + (1 - b1) * g, m)
  p = p - _lr(ok) * (m_new / (jnp.sqrt(v) + EPS) + WD * p)
  return p, m_new, v


#: optimizer name -> (program, why) for the compile benchmark's floors: FLOOR_PROGRAMS, with
#: OAdamW's Newton–Schulz and SCAO's preconditioner and refresh written out
COMPILE_FLOOR_PROGRAMS = {
    **FLOOR_PROGRAMS,
    "stax.oadamw": ("muon", "the momentum pass, five Newton–Schulz iterations per matrix and "
                            "the p pass; AdamW's passes and the check on the other leaves"),
    "stax.oadamw[gradient]": ("ns+stable", "the seed's order: five Newton–Schulz iterations of "
                                           "each matrix's gradient, then StableAdamW's passes "
                                           "(the statistics pass and AdamW's three) on every "
                                           "leaf, and the check on the raw gradient"),
    "stax.scao": ("scao", "AdamW's passes and the check on the effective gradients; the "
                          "preconditioner's products per matrix under the warm-up's "
                          "conditional; each side's QR, Rayleigh–Ritz and eigh under the "
                          "refresh's"),
}

#: SCAO's default rank bounds and largest preconditioned side (stax.scao's)
SCAO_KMIN, SCAO_K, SCAO_MAXD = 8, 128, 4096


def _ns5(x):
  """Five quintic Newton–Schulz iterations (``stax.ns_coefficients("jordan")``, Muon's) on the
  wider orientation of ``x``."""
  import jax.numpy as jnp
  from stax.transforms.orthogonalize import ns_coefficients
  rows, _ = ns_coefficients("jordan", 5)
  tall = x.shape[0] > x.shape[1]
  x = x.T if tall else x
  x = x / (jnp.sqrt(jnp.sum(x * x)) + 1e-7)
  eye = jnp.eye(x.shape[0], dtype=x.dtype)
  for a, b, c in rows:   # as stax's reference: X ← (a·I + b·S + c·S²)·X, one product
    s = x @ x.T
    x = (a * eye + b * s + c * (s @ s)) @ x
  return x.T if tall else x


def _muon_leaf(p, m, g, ok):
  import jax.numpy as jnp
  m = jnp.where(ok, B1 * m + g, m)
  o = _ns5(m.reshape(_matrix(p.shape))).reshape(p.shape)
  return p - _lr(ok) * (o + WD * p), m


def _scao_k(shape):
  """``K`` of a leaf on its matrix view (:func:`_matrix`) as stax.scao's low-rank rule plans
  it (``stax.transforms.kron.lowrank._plan``), or ``None`` (passed through: a vector, a side of
  1, a side above 4096)."""
  from stax.transforms.kron.lowrank import _plan
  if len(shape) < 2:
    return None
  plan = _plan(*_matrix(shape), SCAO_KMIN, SCAO_K, SCAO_MAXD)
  return None if plan is None else plan.kmax


def _scao_precondition(g, ul, ur):
  d = -0.5
  h = g + ul @ (d * (ul.T @ g))
  return h + (d * (h @ ur)) @ ur.T


def _scao_track(u, gs, omega):
  import jax.numpy as jnp
  q, _ = jnp.linalg.qr(jnp.concatenate([u, gs @ omega], axis=1))
  a = q.T @ u
  b = q.T @ gs
  t = 0.9 * (a @ a.T) + 0.1 * (b @ b.T)
  w, v = jnp.linalg.eigh(0.5 * (t + t.T))
  return q @ v[:, ::-1][:, :u.shape[1]]


def _stam_lite_snr_stats(m, g):
  return _stam_lite_stats(m, g, snr=True)


def _check(g_leaves):
  from stax.transforms.guards import all_finite
  return all_finite(g_leaves)


def _compressed_leaf(p, codes, scales, r, c, g, ok, seed):
  """One leaf of the ideal compressed step: 4-bit signed m in blocks of 32, stochastically
  rounded with a counter hash of the element's index and the leaf's ``seed`` (a uint32 scalar),
  factored v."""
  import jax.numpy as jnp
  from stax import numerics as num
  from stax.codecs.packing import pack_bits, unpack_bits
  a1, d1, a2, d2 = 1 - B1, B1, 1 - B2, B2
  rows, n = g.shape[:-1], g.shape[-1]
  nb = n // BLOCK

  def m_new(codes, scales, g):
    k = unpack_bits(codes, 4, n).astype(jnp.float32) - 7.0
    m = (k.reshape(rows + (nb, BLOCK)) * (scales[..., None] / 7.0)).reshape(g.shape)
    return d1 * m + a1 * g

  r_new = jnp.where(ok, d2 * r + a2 * jnp.mean(jnp.square(g), axis=-1), r)
  gi, = num.independent(g)
  c_new = jnp.where(ok, d2 * c + a2 * jnp.mean(jnp.square(gi), axis=-2), c)
  ops = num.independent(codes, scales, g)
  # an integer max of the magnitudes' bits (numerics.absmax): its reduction fuses the new m
  s_new = jnp.where(ok, num.absmax(m_new(*ops).reshape(rows + (nb, BLOCK)), axis=-1), scales)
  ops = num.independent(codes, scales, g)
  x = m_new(*ops).reshape(rows + (nb, BLOCK))
  sf = jnp.where(s_new > 0, s_new, 1.0)[..., None]
  # stochastic rounding, as the codec's: floor(pos + u) is floor(pos) + (u < frac(pos)) for a
  # uniform u in [0, 1) from the codec's counter hash of the element's index (no antithetic pairs)
  from stax.codecs import rng
  u = rng.counter_uniform(rng.flat_index(g.shape), seed, antithetic=False)
  pos = jnp.clip(x / sf * 7.0, -7.0, 7.0).reshape(g.shape)
  k = (jnp.floor(pos + u) + 7.0).astype(jnp.uint8)
  codes_new = jnp.where(ok, pack_bits(k, 4), codes)   # the old encoding on a skipped step
  v_hat = r_new[..., :, None] * c_new[..., None, :] / jnp.maximum(jnp.mean(r_new), 1e-30)
  # selected per element: the new m reads g
  p = jnp.where(ok, p - LR * (m_new(codes, scales, g) / (jnp.sqrt(v_hat) + EPS) + WD * p), p)
  return p, codes_new, s_new, r_new, c_new


def _rows(shape) -> tuple:
  """The 2-D row view a blockwise codec blocks a leaf by, ``(shape[0], rest)``: as many
  elements as stax's row view (:func:`stax.codecs.row_view.row_view_shape`) where it pads
  nothing, as for the benchmarks' conv kernels."""
  return tuple(shape) if len(shape) <= 2 else (shape[0], int(np.prod(shape[1:])))


def _matrix(shape) -> tuple:
  """The matrix Muon and SCAO see a leaf as, :func:`stax.layout.default_dimension_numbers`'
  for these models: ``(in, out)`` itself, a Flax conv kernel ``(kh, kw, in, out)`` the
  ``kh·kw·in × out`` matrix."""
  return tuple(shape) if len(shape) <= 2 else (int(np.prod(shape[:-1])), shape[-1])


def _compressible(x) -> bool:
  rows = _rows(x.shape)
  return len(rows) == 2 and rows[-1] % (2 * BLOCK) == 0 and x.size >= 4096


def init_state(program: str, params: dict, head: str):
  """The program's state for ``params`` (a dict of modules of leaves)."""
  import jax
  import jax.numpy as jnp
  zeros = lambda x: jnp.zeros_like(x)
  if program == "compressed":
    def one(x):
      if not _compressible(x):
        return (zeros(x), zeros(x))
      rows = _rows(x.shape)
      return (jnp.full(rows[:-1] + (rows[-1] // 2,), 0x77, jnp.uint8),
              jnp.zeros(rows[:-1] + (rows[-1] // BLOCK,), jnp.float32),
              jnp.zeros(rows[:-1], jnp.float32), jnp.zeros(rows[-1:], jnp.float32))
    # and the step count, which seeds the stochastic rounding
    return jax.tree.map(one, params), jnp.zeros([], jnp.int32)
  if program == "stac":
    return {k: ((jax.tree.map(zeros, v), jax.tree.map(zeros, v)) if k == head else None)
            for k, v in params.items()}
  if program.startswith("stam_lite"):
    return (jax.tree.map(zeros, params), jax.tree.map(lambda x: jnp.zeros([]), params))
  if program == "scao":
    def factors(x):
      k = _scao_k(x.shape)
      if k is None:
        return None
      m, n = _matrix(x.shape)
      return (jnp.eye(m, k), jnp.eye(n, k), jnp.ones((n, k)) / n, jnp.ones((m, k)) / m)
    return (jax.tree.map(zeros, params), jax.tree.map(zeros, params),
            jax.tree.map(factors, params), jnp.zeros([], jnp.int32))
  return (jax.tree.map(zeros, params), jax.tree.map(zeros, params))


def program_step(program: str, head: str):
  """``step(params, state, grads) -> (params, state)`` of ``program``."""
  import jax
  import jax.numpy as jnp

  def adamw(p, s, g, check, stats):
    m, v = s
    leaves = list(zip(*(jax.tree.leaves(t) for t in (p, m, v, g))))
    if stats == "probed":  # STAM: every leaf's statistics (and probe) first, then the gate
      st = [_once(_stats_probed)(gl, ml) for _, ml, _, gl in leaves]
      ok = _probed_ok([x[2] for x in st])
      out = [_once(_beta1_leaf)(*leaf, x[0], x[1], ok) for leaf, x in zip(leaves, st)]
    else:
      ok = _check([x[3] for x in leaves]) if check else None
      out = []
      for pl, ml, vl, gl in leaves:
        if stats == "m":           # a coefficient from statistics of (g, m)
          out.append(_once(_stats_leaf)(pl, ml, vl, gl, ok))
        else:
          out.append(_once(_adam_leaf)(pl, ml, vl, gl, ok=ok))
    tdef = jax.tree.structure(p)
    return tuple(jax.tree.unflatten(tdef, [o[i] for o in out]) for i in range(3))

  def step(p, s, g):
    if program in ("adamw", "adamw+check"):
      p, m, v = adamw(p, s, g, program == "adamw+check", None)
      return p, (m, v)
    if program in ("adamw+check+stats", "adamw+stats"):
      p, m, v = adamw(p, s, g, True, "m" if program == "adamw+check+stats" else "probed")
      return p, (m, v)
    if program.startswith("stam_lite"):
      m, vs = s
      leaves = list(zip(*(jax.tree.leaves(t) for t in (p, m, vs, g))))
      stats = _once(_stam_lite_snr_stats if program == "stam_lite+m" else _stam_lite_stats)
      st = [stats(ml, gl) for _, ml, _, gl in leaves]
      ok = _probed_ok([x[3] for x in st])
      out = [_once(_stam_lite_leaf)(*leaf, *x[:3], ok) for leaf, x in zip(leaves, st)]
      tdef = jax.tree.structure(p)
      p, m, vs = (jax.tree.unflatten(tdef, [o[i] for o in out]) for i in range(3))
      return p, (m, vs)
    if program == "stac":
      ok = _check(jax.tree.leaves(g))
      new_p, new_s = {}, {}
      for mod in p:
        if mod == head:
          pp, mm, vv = {}, {}, {}
          for k in p[mod]:
            pp[k], mm[k], vv[k] = _once(_adam_leaf)(p[mod][k], s[mod][0][k], s[mod][1][k],
                                                    g[mod][k], ok=ok)
          new_p[mod], new_s[mod] = pp, (mm, vv)
        else:   # selected per element: sign(NaN) is NaN
          new_p[mod] = {k: jnp.where(ok, x - LR * (jnp.sign(g[mod][k]) + WD * x), x)
                        for k, x in p[mod].items()}
          new_s[mod] = None
      return new_p, new_s
    if program == "muon":
      from stax.optimizers.oadamw import oadamw_labels
      m, v = s
      ok = _check(jax.tree.leaves(g))
      labels = jax.tree.leaves(oadamw_labels(p))
      tdef = jax.tree.structure(p)
      out = []
      for lab, pl, ml, vl, gl in zip(labels, *(jax.tree.leaves(t) for t in (p, m, v, g))):
        if lab == "muon":
          pn, mn = _once(_muon_leaf)(pl, ml, gl, ok)
          out.append((pn, mn, vl))
        else:
          out.append(_once(_adam_leaf)(pl, ml, vl, gl, ok=ok))
      p, m, v = (jax.tree.unflatten(tdef, [o[i] for o in out]) for i in range(3))
      return p, (m, v)
    if program == "ns+stable":
      from stax.optimizers.oadamw import oadamw_labels
      ok = _check(jax.tree.leaves(g))
      labels = jax.tree.leaves(oadamw_labels(p))
      orth = lambda x: _ns5(x.reshape(_matrix(x.shape))).reshape(x.shape)
      g = jax.tree.unflatten(jax.tree.structure(g), [
          _once(orth)(gl) if lab == "muon" else gl
          for lab, gl in zip(labels, jax.tree.leaves(g))])
      leaves = list(zip(*(jax.tree.leaves(t) for t in (p, *s, g))))
      out = [_once(_stats_leaf)(*leaf, ok) for leaf in leaves]
      tdef = jax.tree.structure(p)
      p, m, v = (jax.tree.unflatten(tdef, [o[i] for o in out]) for i in range(3))
      return p, (m, v)
    if program == "scao":
      m, v, fac, count = s
      ok = _check(jax.tree.leaves(g))
      tdef = jax.tree.structure(p)
      g_l = jax.tree.leaves(g)
      f_l = tdef.flatten_up_to(fac)
      live = [i for i, f in enumerate(f_l) if f is not None]
      count = jnp.where(ok, count + 1, count)

      mats = {i: g_l[i].reshape(_matrix(g_l[i].shape)) for i in live}

      def precond(fl):
        return [_once(_scao_precondition)(mats[i], fl[i][0], fl[i][1]).reshape(g_l[i].shape)
                for i in live]

      effs = jax.lax.cond(count > 20, precond, lambda fl: [g_l[i] for i in live], f_l)
      eff = list(g_l)
      for i, e in zip(live, effs):
        eff[i] = e

      def refresh(fl):
        fl = list(fl)
        for i in live:
          ul, ur, om_l, om_r = fl[i]
          fl[i] = (_once(_scao_track)(ul, mats[i], om_l), _once(_scao_track)(ur, mats[i].T, om_r),
                   om_l, om_r)
        return fl

      f_l = jax.lax.cond((count % 20 == 0) & ok, refresh, lambda fl: list(fl), f_l)
      out = [_once(_adam_leaf)(pl, ml, vl, gl, ok=ok) for pl, ml, vl, gl in
             zip(jax.tree.leaves(p), jax.tree.leaves(m), jax.tree.leaves(v), eff)]
      p, m, v = (jax.tree.unflatten(tdef, [o[i] for o in out]) for i in range(3))
      return p, (m, v, tdef.unflatten(f_l), count)
    if program == "compressed":
      from stax import _leafwise
      from stax.codecs import rng
      s, count = s
      ok = _check(jax.tree.leaves(g))
      # every leaf's rounding seed in one vector, each picked by a kernel alike for all leaves,
      # as the step's keys are (rng.leaf_keys from a fixed key, _leafwise.pick)
      n_leaves = len(jax.tree.leaves(p))
      seeds = rng.key_to_seed(rng.leaf_keys(jnp.zeros([2], jnp.uint32), count, n_leaves))
      leaf = 0
      new_p, new_s = {}, {}
      for mod in p:
        new_p[mod], new_s[mod] = {}, {}
        for k, x in p[mod].items():
          st = s[mod][k]
          if len(st) == 2:
            pl, ml, vl = _once(_adam_leaf)(x, st[0], st[1], g[mod][k], ok=ok)
            new_p[mod][k], new_s[mod][k] = pl, (ml, vl)
          else:   # on the row view (a reshape: a bitcast in XLA)
            rows = _rows(x.shape)
            pl, *rest = _once(_compressed_leaf)(x.reshape(rows), *st, g[mod][k].reshape(rows),
                                                ok, _leafwise.pick(seeds, leaf))
            new_p[mod][k], new_s[mod][k] = pl.reshape(x.shape), tuple(rest)
          leaf += 1
      return new_p, (new_s, jnp.where(ok, count + 1, count))
    raise ValueError(f"unknown floor program {program!r}")

  return step


def _compiled_program(program: str, params_np: dict, head: str, compile_s: dict | None = None):
  """``(compiled step, [params, state, grads])`` of ``program`` (donated, a fixed gradient);
  ``compile_s[program]``, when given, receives its compile time in seconds."""
  import jax
  import jax.numpy as jnp

  params = jax.tree.map(jnp.asarray, params_np)
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32)
                                             * 1e-3), params_np)
  state = init_state(program, params, head)
  t0 = time.perf_counter()
  compiled = jax.jit(program_step(program, head), donate_argnums=(0, 1)).lower(
      params, state, grads).compile()
  if compile_s is not None:
    compile_s[program] = time.perf_counter() - t0
  return compiled, [params, state, grads]


def programs_for(names) -> list[str]:
  """The floor programs of the optimizers ``names``, ``adamw`` (the method's check) first."""
  return list(dict.fromkeys(["adamw"] + [FLOOR_PROGRAMS[n][0] for n in names
                                         if n in FLOOR_PROGRAMS]))


def floor_records(times: dict, programs, compiled: dict, base: str = "optax.adamw") -> dict:
  """``{program: {"step_ms", "vs_optax_adamw", "optax_adamw_ms", "bytes_accessed"}}`` from the
  interleaved call times ``times`` (``{name: [seconds]}``, programs under ``"floor:" + name``)
  and the compiled programs ``compiled`` (``{program: compiled}``)."""
  b = statistics.median(times[base])
  out = {}
  for p in programs:
    ca = compiled[p].cost_analysis()
    ca = (ca[0] if isinstance(ca, (list, tuple)) and ca else ca) or {}
    med = statistics.median(times["floor:" + p])
    out[p] = {"step_ms": 1e3 * med, "vs_optax_adamw": med / b, "optax_adamw_ms": 1e3 * b,
              "bytes_accessed": float(ca.get("bytes accessed", np.nan))}
  return out


def time_floors(size: str, names, *, rounds: int = 10, calls: int = 3) -> dict:
  """The minimal programs of the optimizers ``names`` (and ``adamw``, the method's check) on
  the speed benchmark's parameter set ``size``, timed *interleaved* with ``optax.adamw``
  (:func:`benchmarks.speed.interleave`: ``rounds`` rounds of ``calls`` calls each), so the
  machine's load moves them alike. Returns :func:`floor_records`; the ratio is the robust
  number. (The speed benchmark interleaves the programs with every optimizer's step instead.)"""
  import optax

  from benchmarks import speed as S
  params, order = S.make_params(size)
  programs = programs_for(names)
  compiled, args, _ = S.prepare_jax(optax.adamw(1e-3), params)
  runs = {"optax.adamw": (compiled, args)}
  for p in programs:
    runs["floor:" + p] = _compiled_program(p, params, order[-1])
  times = S.interleave(runs, rounds=rounds, calls=calls)
  return floor_records(times, programs, {p: runs["floor:" + p][0] for p in programs})


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", default="16M")
  ap.add_argument("--rounds", type=int, default=10)
  args = ap.parse_args(argv)
  from benchmarks import speed as S
  for prog, rec in time_floors(args.size, list(FLOOR_PROGRAMS), rounds=args.rounds).items():
    print(f"{prog:20s} {rec['step_ms']:8.2f} ms  {rec['vs_optax_adamw']:5.2f}× optax.adamw "
          f"({rec['optax_adamw_ms']:.2f} ms)  "
          f"{rec['bytes_accessed'] / S.n_params_of(args.size):5.1f} B/param")


if __name__ == "__main__":
  main()
