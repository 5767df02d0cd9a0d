"""Paths, module order (execution order, natural fallback), tied parameters, label functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import stax
from stax import partition


class DeepMLP(nn.Module):
  n: int = 12

  @nn.compact
  def __call__(self, x):
    for _ in range(self.n - 1):
      x = nn.relu(nn.Dense(8)(x))
    return nn.Dense(3)(x)


def _linen_deep():
  model = DeepMLP()
  x = jnp.ones((2, 5))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  return model, params, x


def test_normalize_path_drops_nnx_value_and_handles_strings():
  # Strings are names: a module or leaf called "value" (attention's value projection) stays.
  assert partition.normalize_path("lin/kernel/value") == ("lin", "kernel", "value")
  assert partition.normalize_path("attn/value") == ("attn", "value")
  # Only the attribute key of an NNX Variable is dropped, not a dict key named "value".
  assert partition.normalize_path((jax.tree_util.DictKey("value"),
                                   jax.tree_util.DictKey("kernel"),
                                   jax.tree_util.GetAttrKey("value"))) == ("value", "kernel")
  assert partition.normalize_path((jax.tree_util.DictKey("attn"),
                                   jax.tree_util.DictKey("value"))) == ("attn", "value")
  assert partition.normalize_path(("a", "b")) == ("a", "b")
  keys = (jax.tree_util.DictKey("layers"), jax.tree_util.SequenceKey(3),
          jax.tree_util.GetAttrKey("kernel"), jax.tree_util.GetAttrKey("value"))
  assert partition.path_name(keys) == "layers/3/kernel"
  assert partition.module_name(keys) == "layers/3"
  assert partition.module_name("w") == "<root>"


def test_natural_key_orders_digit_runs_numerically():
  names = ["Dense_10", "Dense_2", "Dense_1", "block_3/attn", "block_12/attn"]
  assert sorted(names, key=partition.natural_key) == [
      "Dense_1", "Dense_2", "Dense_10", "block_3/attn", "block_12/attn"]


def test_linen_twelve_dense_layers_last_two_are_dense_10_and_11():
  model, params, x = _linen_deep()
  # Flatten order is lexicographic: a naive "last leaves" rule would pick Dense_8/Dense_9.
  flat_modules = [partition.module_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert flat_modules[-1] == "Dense_9"
  order = stax.execution_order(lambda p, x: model.apply({"params": p}, x), params, x)
  assert order == [f"Dense_{i}" for i in range(12)]
  assert stax.natural_order(params) == order  # the fallback agrees here
  labels = stax.stac_labels(params, 2, module_order=order)
  cap = sorted({partition.module_name(p) for p, l in jax.tree_util.tree_flatten_with_path(labels)[0]
                if l == "cap"})
  assert cap == ["Dense_10", "Dense_11"]


def test_execution_order_walks_into_jit_and_scan_and_ignores_casts():
  params = {"z_first": {"w": jnp.ones((3, 3))}, "a_second": {"w": jnp.ones((3, 3))},
            "m_third": {"w": jnp.ones((3,))}}

  @jax.jit
  def inner(w, x):
    return jnp.tanh(x @ w.astype(jnp.bfloat16).astype(jnp.float32))

  def fwd(p, x):
    x = inner(p["z_first"]["w"], x)
    x, _ = jax.lax.scan(lambda c, _: (c @ p["a_second"]["w"], None), x, None, length=2)
    return x * p["m_third"]["w"]

  order = stax.execution_order(fwd, params, jnp.ones((2, 3)))
  assert order == ["z_first", "a_second", "m_third"]


class NNXModel(nnx.Module):
  """`head` sorts before `layers`, but runs after them."""

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)])
    self.head = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    for l in self.layers:
      x = nnx.relu(l(x))
    return self.head(x)


def nnx_order(model, x, **kw):
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  return stax.execution_order(lambda s, x: nnx.merge(graphdef, s, rest)(x), state, x, **kw)


def test_nnx_head_after_layers_and_paths_normalised():
  model = NNXModel(nnx.Rngs(0))
  x = jnp.ones((1, 4))
  order = nnx_order(model, x)
  assert order == ["layers/0", "layers/1", "head"]
  assert stax.natural_order(nnx.state(model, nnx.Param))[0] == "head"  # why the fallback is not enough
  tx = stax.stac(1e-2, last_n_modules=1, module_order=order)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  opt.update(model, grads)
  after = nnx.state(model, nnx.Param)
  # Only the head has Adam moments; the trunk moved by exactly lr·sign(g) (no decay: default 0).
  leaves = jax.tree_util.tree_flatten_with_path(opt.opt_state)[0]
  mu_paths = {partition.path_name(p) for p, x in leaves if "/mu/" in partition.path_name(p)
              and np.size(x) > 1}
  assert mu_paths and all("head" in p for p in mu_paths), mu_paths
  k0 = lambda st: np.asarray(st["layers"][0]["kernel"][...])
  np.testing.assert_allclose(k0(after), k0(before) - 1e-2 * np.sign(k0(grads)), atol=1e-7)


class Tied(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.block = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, ids):
    h = nnx.relu(self.block(self.embed(ids)))
    return self.embed.attend(h)  # tied output head


def test_tied_embedding_head_rule():
  model = Tied(nnx.Rngs(0))
  ids = jnp.array([[1, 2, 3]])
  assert nnx_order(model, ids, tied="first_use") == ["embed", "block"]  # the seed's rule
  assert nnx_order(model, ids, tied="last_use") == ["block", "embed"]   # stax's STAC rule
  state = nnx.state(model, nnx.Param)
  labels = stax.stac_labels(state, 1, module_order=nnx_order(model, ids, tied="last_use"))
  flat = {partition.path_name(p): l for p, l in jax.tree_util.tree_flatten_with_path(labels)[0]}
  assert flat["embed/embedding"] == "cap" and flat["block/kernel"] == "trunk"


def test_module_order_must_cover_every_module():
  _, params, _ = _linen_deep()
  with pytest.raises(ValueError, match="module_order"):
    partition.module_ranks(params, ["Dense_0", "Dense_1"])
  with pytest.raises(ValueError, match="twice"):
    partition.module_ranks(params, [f"Dense_{i}" for i in range(12)] + ["Dense_0"])


def test_last_n_labels_bounds():
  _, params, _ = _linen_deep()
  order = [f"Dense_{i}" for i in range(12)]
  count = lambda labels, l: sum(x == l for x in jax.tree.leaves(labels))
  assert count(stax.last_n_modules_labels(params, 0, order), "cap") == 0
  assert count(stax.last_n_modules_labels(params, 50, order), "trunk") == 0
  with pytest.raises(ValueError, match="n"):
    stax.last_n_modules_labels(params, -1, order)


def test_matrix_labels_excludes_embeddings_heads_vectors_and_thin():
  params = {"embed": {"embedding": jnp.zeros((10, 8))}, "block": {"kernel": jnp.zeros((8, 8)),
            "bias": jnp.zeros(8)}, "lm_head": {"kernel": jnp.zeros((8, 10))},
            "conv": {"kernel": jnp.zeros((3, 3, 4, 8))}, "thin": {"kernel": jnp.zeros((8, 1))}}
  labels = stax.matrix_labels(params)
  assert labels["block"]["kernel"] == "matrix" and labels["conv"]["kernel"] == "matrix"
  for m, k in [("embed", "embedding"), ("block", "bias"), ("lm_head", "kernel"), ("thin", "kernel")]:
    assert labels[m][k] == "other", (m, k)
  assert stax.matrix_labels(params, exclude=())["lm_head"]["kernel"] == "matrix"


def test_output_head_predicate_spares_nested_output_layers():
  # BERT's hidden "output" layers are matrices for Muon; a top-level "output" is a head.
  assert partition.is_output_head_path("output/kernel")
  assert partition.is_output_head_path("lm_head/weight")
  assert partition.is_output_head_path("classifier/weight")
  assert not partition.is_output_head_path("bert/encoder/layer/0/attention/output/dense/weight")
  assert not partition.is_output_head_path("bert/encoder/layer/0/output/dense/weight")


def test_head_and_embedding_rules_read_components_and_skip_wrappers():
  """A head is a path component (``head``, ``lm_head``, ``cls_head``, ``head2``...), not
  ``head`` between underscores (a ``multi_head_attention`` block's projections had been kept
  out of Muon); wrappers' components (torch.compile's ``_orig_mod``, DDP's leading ``module``,
  FSDP1's and activation checkpointing's) are skipped, so a wrapped model is grouped as the
  model (``torch.compile(model)``'s top-level ``output`` head had been a hidden matrix)."""
  head = partition.is_output_head_path
  for name in ("head/kernel", "lm_head.weight", "model.cls_head.weight", "heads.head2.weight",
               "classifier.weight", "logits/kernel", "_orig_mod.output.weight",
               "module.output.weight", "module._orig_mod.lm_head.weight",
               "_fsdp_wrapped_module.output.weight"):
    assert head(name), name
  for name in ("multi_head_attention.q_proj.weight", "encoder/attn_heads/query/kernel",
               "blocks.0.head_proj.weight", "model.layers.0.self_attn.o_proj.weight",
               "_orig_mod.bert.encoder.layer.0.output.dense.weight", "module.layer.weight"):
    assert not head(name), name
  assert partition.is_embedding_path("_orig_mod.model.embed_tokens.weight")
  assert partition.is_embedding_path("module.wte.weight")
  assert not partition.is_embedding_path("_orig_mod.layers.0.mlp.weight")
