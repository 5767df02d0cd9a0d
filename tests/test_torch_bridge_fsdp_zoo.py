"""torch_bridge under FSDP2 on real layouts (tests/fsdp_zoo_worker.py, 2 ranks, gloo, CPU): the
zoo's conv net and Hugging Face GPT-2, sharded with ``fully_shard``, stepped in each
``dtensor`` mode (``"auto"`` → local shards for AdamW, full copies for TurboAdam's codec blocks
across conv-kernel shards; ``"owner"`` for OAdamW's Muon on conv kernels and GPT-2's fused
``c_attn``, and for StableAdamW's per-tensor clip), equal to one process."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
  pytest.skip("torch without gloo", allow_module_level=True)

from tests import fsdp_zoo_worker as W  # noqa: E402
from tests.localhost_ranks import run_ranks  # noqa: E402

# float32 rounding: FSDP's reduce-scatter averages the ranks' (equal) gradients in its own order
ATOL = 2e-6
CASES = [(m, c) for m in W.MODELS for c in W.configs()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("fsdp_zoo")
  run_ranks("tests.fsdp_zoo_worker", [out], timeout_s=600)
  return out


@pytest.mark.parametrize("model_name, cfg", CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_fsdp2_zoo_step_equals_one_process(runs, model_name, cfg):
  got = torch.load(runs / f"{model_name}-{cfg}.pt")
  want = W.run(model_name, cfg, sharded=False)
  start = {k: v.detach() for k, v in W.zoo(model_name)[0](0).named_parameters()}
  assert got.keys() == want.keys()
  moved = max(float((want[k] - start[k]).abs().max()) for k in want)
  assert moved > 1e-3                                   # the run moved the parameters
  for k in want:
    assert float((got[k] - want[k]).abs().max()) <= ATOL, k
