"""A small model zoo (Flax NNX and Linen) for running every registry optimizer on real layouts.

Each model is small (widths 8–64, one or two layers, batches of 4) so that one compile is quick,
yet its parameters carry the layouts an optimizer has to get right:

* ``nnx_transformer`` — ``nnx.MultiHeadAttention`` (q/k/v kernels ``(in, heads, head_dim)``,
  biases ``(heads, head_dim)``, out kernel ``(heads, head_dim, out)``), LayerNorms and an MLP;
* ``nnx_tied_lm`` — ``nnx.Embed`` whose table is also the output head (``embed.attend``);
* ``nnx_convnet`` — ``nnx.Conv`` kernels ``(kh, kw, in, out)`` and ``nnx.BatchNorm`` (its batch
  statistics are ``nnx.BatchStat``, not ``nnx.Param``: the optimizer must leave them alone);
* ``nnx_scan`` — blocks created with ``nnx.vmap`` and applied with ``nnx.scan`` (stacked kernels
  ``(L, in, out)``, stacked biases and LayerNorm scales ``(L, d)``);
* ``linen_zoo`` — a Linen ``nn.Conv`` → ``nn.MultiHeadDotProductAttention`` →
  ``nn.DenseGeneral`` model trained through ``flax.training.train_state.TrainState``.

Every builder returns a :class:`ZooModel`: how to build the module, a batch for each step, the
loss, the forward function for :func:`stax.execution_order`, and the expected layout of the
interesting leaves (``KINDS``: normalised path → kind) that the layout tests check.

Sizes were chosen so that every compressed leaf's element count is a multiple of 128 and every
trailing axis a multiple of 8 (the zoo's TurboAdam block is 16, see tests/test_zoo_flax.py): the
codec's bits/param can then be checked exactly, independently of the leaf's layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx

BATCH = 4

# Leaf kinds (the layout each must be seen as; see tests/test_zoo_flax.py).
QKV = "qkv"              # (in, heads, head_dim): one in × (heads·head_dim) matrix
ATTN_OUT = "attn_out"    # (heads, head_dim, out): one (heads·head_dim) × out matrix
ATTN_BIAS = "attn_bias"  # (heads, head_dim): a bias, never a matrix
CONV = "conv"            # (kh, kw, in, out): one (kh·kw·in) × out matrix
STACKED = "stacked"      # (L, in, out): L matrices in × out
STACKED_VEC = "stacked_vec"  # (L, d): L vectors (biases, norm scales), never a matrix
DENSE = "dense"          # (in, out): one in × out matrix
EMBED = "embed"          # an embedding table (tied head included): never Muon
HEAD = "head"            # an untied output head: never Muon


@dataclasses.dataclass(frozen=True)
class ZooModel:
  """One zoo model.

  Attributes:
    name: test id.
    kind: ``"nnx"`` or ``"linen"``.
    build: NNX: ``build() -> nnx.Module``; Linen: ``build() -> (module, params)``.
    batch: ``batch(step) -> (x, y)``, deterministic per step.
    loss: NNX: ``loss(model, x, y)``; Linen: ``loss(params, x, y)`` (a closure over the module).
    kinds: normalised path → leaf kind, for the leaves whose layout matters.
  """

  name: str
  kind: str
  build: Callable[[], Any]
  batch: Callable[[int], tuple]
  loss: Callable[..., jax.Array]
  kinds: dict

  def forward_fn(self, module_or_graph: Any = None, rest: Any = None) -> Callable:
    """``fn(params, x)`` for :func:`stax.execution_order` (NNX: from ``nnx.split``).

    NNX merges with ``copy=True``: a model whose forward pass writes state (BatchNorm's batch
    statistics in training mode) raises ``TraceContextError`` under the tracer otherwise,
    because ``rest``'s Variables belong to the outer trace.
    """
    if self.kind == "linen":
      return lambda p, x: module_or_graph.apply({"params": p}, x)
    return lambda p, x: nnx.merge(module_or_graph, p, rest, copy=True)(x)


def _normal(step: int, salt: int, shape, dtype=jnp.float32):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), salt), step)
  return jax.random.normal(key, shape, dtype)


def _mse(pred, y):
  return jnp.mean((pred - y) ** 2)


# --------------------------------------------------------------------------- (a) transformer
class NNXTransformer(nnx.Module):
  """Pre-LN transformer block (4 heads of 8 over width 32) and a linear head.

  Attention keeps its biases (the ``(heads, head_dim)`` layout under test); the LayerNorms,
  MLP and head have none (fewer leaves: each leaf adds to every optimizer's compile time).
  """

  def __init__(self, rngs: nnx.Rngs, d: int = 32, heads: int = 4, hidden: int = 64,
               out: int = 8):
    self.ln1 = nnx.LayerNorm(d, use_bias=False, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False,
                                       keep_rngs=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, use_bias=False, rngs=rngs)
    self.mlp_in = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
    self.mlp_out = nnx.Linear(hidden, d, use_bias=False, rngs=rngs)
    self.head = nnx.Linear(d, out, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))
    return self.head(x)


def nnx_transformer() -> ZooModel:
  """(a) ``nnx.MultiHeadAttention`` + LayerNorm + MLP on (4, 8, 32) sequences."""
  kinds = {f"attn/{n}/kernel": QKV for n in ("query", "key", "value")}
  kinds.update({f"attn/{n}/bias": ATTN_BIAS for n in ("query", "key", "value")})
  kinds.update({"attn/out/kernel": ATTN_OUT, "mlp_in/kernel": DENSE, "mlp_out/kernel": DENSE,
                "head/kernel": HEAD})
  return ZooModel(
      "nnx_transformer", "nnx", lambda: NNXTransformer(nnx.Rngs(0)),
      lambda s: (_normal(s, 0, (BATCH, 8, 32)), _normal(s, 1, (BATCH, 8, 8))),
      lambda m, x, y: _mse(m(x), y), kinds)


# --------------------------------------------------------------------------- (b) tied LM
class NNXTiedLM(nnx.Module):
  """Token embedding (64 × 32), one hidden layer, and the embedding as the output head."""

  def __init__(self, rngs: nnx.Rngs, vocab: int = 64, d: int = 32):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.hidden = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, tok):
    h = jax.nn.gelu(self.hidden(self.embed(tok)))
    return self.embed.attend(h)


def _tokens(step: int, salt: int):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(11), salt), step)
  return jax.random.randint(key, (BATCH, 8), 0, 64)


def nnx_tied_lm() -> ZooModel:
  """(b) ``nnx.Embed`` with a tied output head (``embed.attend``), next-token-style targets."""
  def loss(m, tok, tgt):
    return optax.softmax_cross_entropy_with_integer_labels(m(tok), tgt).mean()

  return ZooModel(
      "nnx_tied_lm", "nnx", lambda: NNXTiedLM(nnx.Rngs(0)),
      lambda s: (_tokens(s, 0), (_tokens(s, 0) * 7 + 3) % 64), loss,
      {"embed/embedding": EMBED, "hidden/kernel": DENSE})


# --------------------------------------------------------------------------- (c) convnet
class NNXConvNet(nnx.Module):
  """Two 3×3 convs (8 → 16 → 16), the first (no bias) with BatchNorm, global average pool,
  linear head."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(8, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 16, (3, 3), rngs=rngs)
    self.head = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = jax.nn.relu(self.conv2(x))
    return self.head(x.mean(axis=(1, 2)))


def nnx_convnet() -> ZooModel:
  """(c) ``nnx.Conv`` + ``nnx.BatchNorm`` (training mode: batch stats change every step)."""
  return ZooModel(
      "nnx_convnet", "nnx", lambda: NNXConvNet(nnx.Rngs(0)),
      lambda s: (_normal(s, 2, (BATCH, 6, 6, 8)), _normal(s, 3, (BATCH, 8))),
      lambda m, x, y: _mse(m(x), y),
      {"conv1/kernel": CONV, "conv2/kernel": CONV, "head/kernel": HEAD})


# --------------------------------------------------------------------------- (d) scan
N_LAYERS = 4


class Block(nnx.Module):
  """Residual MLP block: LayerNorm → Linear(32, 32) → gelu."""

  def __init__(self, rngs: nnx.Rngs, d: int = 32):
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.linear = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x):
    return x + jax.nn.gelu(self.linear(self.norm(x)))


class NNXScan(nnx.Module):
  """Input layer, ``N_LAYERS`` blocks made by ``nnx.vmap`` and run by ``nnx.scan``, head."""

  def __init__(self, rngs: nnx.Rngs, d_in: int = 16, d: int = 32, out: int = 8):
    self.inp = nnx.Linear(d_in, d, rngs=rngs)

    @nnx.split_rngs(splits=N_LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)

    self.layers = create(rngs)
    self.head = nnx.Linear(d, out, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(block, h):
      return block(h)

    return self.head(run(self.layers, self.inp(x)))


def nnx_scan() -> ZooModel:
  """(d) ``nnx.vmap``-created, ``nnx.scan``-applied blocks: kernels ``(4, 32, 32)``."""
  return ZooModel(
      "nnx_scan", "nnx", lambda: NNXScan(nnx.Rngs(0)),
      lambda s: (_normal(s, 4, (BATCH, 16)), _normal(s, 5, (BATCH, 8))),
      lambda m, x, y: _mse(m(x), y),
      {"layers/linear/kernel": STACKED, "layers/linear/bias": STACKED_VEC,
       "layers/norm/scale": STACKED_VEC, "layers/norm/bias": STACKED_VEC,
       "inp/kernel": DENSE, "head/kernel": HEAD})


# --------------------------------------------------------------------------- Linen
class LinenZoo(nn.Module):
  """``nn.Conv`` (stride 2) → tokens → ``nn.MultiHeadDotProductAttention`` (4 heads of 8) →
  ``nn.DenseGeneral`` to ``(4, 8)`` and back over both axes → pooled ``nn.Dense`` head."""

  @nn.compact
  def __call__(self, img):
    h = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(img))          # (B, 4, 4, 32)
    t = h.reshape(h.shape[0], -1, h.shape[-1])                      # (B, 16, 32)
    t = t + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(t)
    u = jax.nn.gelu(nn.DenseGeneral((4, 8), use_bias=False)(t))     # kernel (32, 4, 8)
    t = t + nn.DenseGeneral(32, axis=(-2, -1), use_bias=False)(u)   # kernel (4, 8, 32)
    # Named "head": OAdamW finds output heads by path name (a bare Dense_0 is not one).
    return nn.Dense(8, name="head")(t.mean(axis=1))


def linen_zoo() -> ZooModel:
  """Linen ``TrainState`` model: Conv, MultiHeadDotProductAttention, DenseGeneral, Dense."""
  module = LinenZoo()
  x0 = _normal(0, 6, (BATCH, 8, 8, 8))

  def build():
    return module, module.init(jax.random.PRNGKey(0), x0)["params"]

  mha = "MultiHeadDotProductAttention_0"
  kinds = {f"{mha}/{n}/kernel": QKV for n in ("query", "key", "value")}
  kinds.update({f"{mha}/{n}/bias": ATTN_BIAS for n in ("query", "key", "value")})
  kinds.update({f"{mha}/out/kernel": ATTN_OUT, "Conv_0/kernel": CONV, "head/kernel": HEAD})
  # DenseGeneral_0 (32, 4, 8) and DenseGeneral_1 (4, 8, 32) are generic: nothing tells them from
  # a stacked (L, in, out) kernel, so no layout is asserted for them.
  return ZooModel(
      "linen_zoo", "linen", build,
      lambda s: (_normal(s, 6, (BATCH, 8, 8, 8)), _normal(s, 7, (BATCH, 8))),
      lambda p, x, y: _mse(module.apply({"params": p}, x), y), kinds)


BUILDERS = (nnx_transformer, nnx_tied_lm, nnx_convnet, nnx_scan, linen_zoo)
MODELS = {b.__name__: b for b in BUILDERS}
