"""One rank of the FSDP2 zoo test (tests/test_torch_bridge_fsdp_zoo.py): real layouts under
``fully_shard`` — the zoo's conv net (``(out, in, kh, kw)`` kernels, BatchNorm) and its Hugging
Face GPT-2 (``Conv1D`` weights ``(in, out)``, the head tied to the embedding) — stepped by the
bridge in each ``dtensor`` mode.

Every rank trains on the *whole* batch (FSDP's reduce-scatter then averages equal gradients, and
BatchNorm sees the batch one process sees), so the run must equal one process up to float32
rounding: what differs is only how the optimizer handles the shards.

``python -m tests.fsdp_zoo_worker RANK PORT OUT_DIR`` (2 ranks, gloo, localhost).
"""

from __future__ import annotations

import pathlib
import sys

import torch

STEPS = 3

MODELS = ("convnet", "gpt2")


def configs() -> dict:
  """name → (factory, bridge kwargs, the dtensor mode it must resolve to)."""
  import stax
  return {
      "adamw": (stax.adamw, dict(lr=1e-2, weight_decay=1e-2), "local"),       # "auto"
      "turbo_adam": (stax.turbo_adam, dict(lr=1e-2), "full"),                 # "auto": codec
      "oadamw_owner": (stax.oadamw, dict(lr=1e-2, dtensor="owner"), "owner"),
      "stable_adamw_owner": (stax.stable_adamw, dict(lr=1e-2, dtensor="owner"), "owner"),
  }


def zoo(name: str):
  from tests import zoo_torch as Z
  if name == "convnet":
    return Z.build_convnet, Z.convnet_batch, Z.convnet_loss
  return Z.build_gpt2, Z.gpt2_batch, Z.hf_loss


def shard(model: torch.nn.Module, name: str) -> torch.nn.Module:
  from torch.distributed.fsdp import fully_shard
  blocks = (list(model.transformer.h) if name == "gpt2" else
            [model.conv1, model.conv2, model.classifier])
  for b in blocks:
    fully_shard(b)
  fully_shard(model)
  return model


def run(model_name: str, cfg: str, sharded: bool) -> dict:
  """``STEPS`` steps of one configuration; the full parameters (by name) at the end.

  torch runs on one thread here (and the ranks too): with more, MKL may use fewer threads when
  the machine is busy and round the matmuls differently, and GPT-2's key-bias gradient is pure
  rounding noise (softmax ignores it), which Adam turns into steps of ±lr.
  """
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    return _run(model_name, cfg, sharded)
  finally:
    torch.set_num_threads(threads)


def _run(model_name: str, cfg: str, sharded: bool) -> dict:
  import torch_bridge
  build, batch, loss_fn = zoo(model_name)
  m = build(0)
  if sharded:
    m = shard(m, model_name)
  factory, kw, mode = configs()[cfg]
  opt = torch_bridge.Optimizer(m.parameters(), factory, **kw)
  if sharded:
    assert opt._dtensor_mode == mode, (model_name, cfg, opt._dtensor_mode)
  for step in range(STEPS):
    opt.zero_grad()
    loss_fn(m, batch(step)).backward()
    opt.step()
  return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
          for n, p in m.named_parameters()}


def main(argv) -> None:
  from tests.localhost_ranks import gloo_rank
  rank, port, out = int(argv[0]), argv[1], pathlib.Path(argv[2])
  with gloo_rank(rank, port):
    for model_name in MODELS:
      for cfg in configs():
        got = run(model_name, cfg, sharded=True)
        if rank == 0:
          torch.save(got, out / f"{model_name}-{cfg}.pt")


if __name__ == "__main__":
  main(sys.argv[1:])
