"""stax.describe: every leaf's rule, matrix view and exact state bytes (JAX and torch names)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stax
from stax.codecs.accounting import state_bytes


def _params():
  return {"embed": {"embedding": jnp.zeros((64, 16))},
          "attn": {"query": {"kernel": jnp.zeros((16, 4, 8)), "bias": jnp.zeros((4, 8))},
                   "out": {"kernel": jnp.zeros((4, 8, 16)), "bias": jnp.zeros((16,))}},
          "conv": {"kernel": jnp.zeros((3, 3, 16, 32))},
          "head": {"kernel": jnp.zeros((32, 10))}}


@pytest.mark.parametrize("make", [
    lambda: stax.adamw(1e-3), lambda: stax.oadamw(1e-3), lambda: stax.scao(1e-3, k_min=1, k_max=4),
    lambda: stax.turbo_adam(1e-3, min_compress_elements=256),
    lambda: stax.turbo_adam(1e-3, min_compress_elements=256, codec="stax"),
    lambda: stax.stac(1e-3, last_n_modules=1,
                      module_order=["embed", "attn/query", "attn/out", "conv", "head"])])
def test_bytes_add_up_to_the_state(make):
  tx, params = make(), _params()
  d = stax.describe(tx, params)
  assert [r.path for r in d] == stax.leaf_names(params)
  assert d.total_state_bytes == state_bytes(tx.init(params))


def test_rules_and_matrix_views():
  d = stax.describe(stax.oadamw(1e-3), _params()).by_path
  assert (d["attn/query/kernel"].rule, d["attn/query/kernel"].matrix) == ("muon", (1, 16, 32))
  assert (d["attn/out/kernel"].rule, d["attn/out/kernel"].matrix) == ("muon", (1, 32, 16))
  assert (d["conv/kernel"].rule, d["conv/kernel"].matrix) == ("muon", (1, 144, 32))
  for name in ("attn/query/bias", "attn/out/bias", "embed/embedding", "head/kernel"):
    assert d[name].rule == "adam" and d[name].matrix is None, name
  s = stax.describe(stax.stac(1e-3, last_n_modules=1,
                              module_order=["embed", "attn/query", "attn/out", "conv", "head"]),
                    _params()).by_path
  assert s["head/kernel"].rule == "adam" and s["conv/kernel"].rule == "sign"
  assert s["conv/kernel"].state_bytes == 0
  t = stax.describe(stax.turbo_adam(1e-3, min_compress_elements=256, codec="stax"),
                    _params()).by_path
  assert np.isclose(t["conv/kernel"].bits_per_param, 8.75)
  assert "BlockSigned" in t["conv/kernel"].storage and "float32" in t["attn/out/bias"].storage
  assert t["attn/out/bias"].bits_per_param == 64.0
  assert "path" in str(stax.describe(stax.adamw(1e-3), _params())).splitlines()[0]


def test_torch_names_and_fused_attention():
  torch = pytest.importorskip("torch")
  import torch_bridge
  layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
  d = torch_bridge.OAdamW(layer, lr=1e-3).describe().by_path
  assert d["self_attn.in_proj_weight"].matrix == (3, 32, 32)     # q, k, v separately
  assert d["self_attn.in_proj_bias"].rule == "adam"
  assert d["linear1.weight"].rule == "muon"
  conv = torch.nn.Conv2d(64, 64, 3)
  t = torch_bridge.TurboAdam(conv, lr=1e-3, codec="stax").describe().by_path
  assert np.isclose(t["weight"].bits_per_param, 8.75)              # not 229: rows of in·kh·kw


def test_a_factored_second_moment_shows_its_matrices():
  """TurboAdam's default (factored) v lists the matrices it is factored over, from its state:
  stacked layers one per layer, a Flax ``query`` kernel one ``in × heads·dh`` matrix, a conv
  kernel ``kh·kw·in × out``; a leaf kept in float32 (a bias) has none. (The column had read
  ``-`` for every TurboAdam leaf.)"""
  params = {"layers": {"kernel": jnp.zeros((3, 32, 16)), "bias": jnp.zeros((3, 16))},
            **_params()}
  d = stax.describe(stax.turbo_adam(1e-3, min_compress_elements=256), params).by_path
  assert "Factored" in d["layers/kernel"].storage
  assert d["layers/kernel"].matrix == (3, 32, 16)
  assert d["attn/query/kernel"].matrix == (1, 16, 32)
  assert d["conv/kernel"].matrix == (1, 144, 32)
  assert d["head/kernel"].matrix == (1, 32, 10)
  assert d["layers/bias"].matrix is None and d["attn/out/bias"].matrix is None
  assert all(r.rule == "adam" for r in d.values())
  s = stax.describe(stax.turbo_adam(1e-3, min_compress_elements=256, codec="stax"),
                    params).by_path
  assert s["layers/kernel"].matrix is None   # a log-quantised v: no matrices


def test_an_nnx_state_of_params_is_described_as_its_arrays():
  """``stax.describe`` on an ``nnx.State`` of ``Param`` Variables (``nnx.split(model,
  nnx.Param)``) gives the table of its pure arrays: the state leaves kept outside the Variables
  (STAMLite's per-tensor v, TurboAdam's codes) had been counted as shared state, and every
  TurboAdam leaf read "stateless". A per-tensor statistic says so in the storage column."""
  nnx = pytest.importorskip("flax.nnx")
  _, params = nnx.split(nnx.Linear(64, 128, rngs=nnx.Rngs(0)), nnx.Param)
  for tx in (stax.stam_lite(1e-3), stax.turbo_adam(1e-3)):
    boxed, pure = stax.describe(tx, params), stax.describe(tx, nnx.as_pure(params))
    assert [tuple(r) for r in boxed] == [tuple(r) for r in pure]
    assert boxed.shared_bytes == pure.shared_bytes
  rows = stax.describe(stax.stam_lite(1e-3), params).by_path
  assert rows["kernel"].storage == "m float32, v float32 per tensor"
  assert rows["kernel"].state_bytes == 64 * 128 * 4 + 4
  turbo = stax.describe(stax.turbo_adam(1e-3), params).by_path["kernel"]
  assert turbo.rule == "adam" and turbo.storage.startswith("m BlockSigned")
