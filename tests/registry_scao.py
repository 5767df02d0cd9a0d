"""Contract-registry entries for SCAO: both modes, reaching the preconditioned phase.

Small ``warmup_steps``/``precond_freq`` so the contract problems run mostly preconditioned
(phase 2 from step 21, full blend from step 31). ``k_max=3`` and, for the faithful mode,
``max_precond_dim=8`` (block grid of 8×8 blocks) keep every factor shape different from the
parameter shapes of the contract tree, so the sharding contract's "state follows its parameter"
check only sees Adam's moments; the factors are small and replicated.
"""

import stax
from tests.registry import Entry

_STATIC = ("warmup_steps", "precond_freq", "min_precond_updates", "k_min", "k_max",
           "max_precond_dim", "blend_steps", "mode", "seed")
_COMMON = dict(learning_rate=3e-2, weight_decay=0.0, warmup_steps=20, precond_freq=5,
               min_precond_updates=2, blend_steps=10, k_min=1, k_max=3)

ENTRIES = [
    Entry("scao_lowrank", stax.scao, dict(_COMMON, mode="lowrank"), static_args=_STATIC,
          sharding_atol=1e-5,
          note="factor work runs on the replicated gradient; float32 reduction order differs "
               "slightly from one device"),
    Entry("scao_0.2.4", stax.scao, dict(_COMMON, mode="scao-0.2.4", max_precond_dim=8),
          static_args=_STATIC, sharding_atol=1e-5,
          note="faithful scao 0.2.4; block grid of 8x8 blocks exercised"),
]
