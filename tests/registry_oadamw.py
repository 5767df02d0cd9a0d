"""Contract-registry entries for OAdamW (both Muon modes) and StableAdamW."""

import stax
from tests.registry import Entry

_STATIC = ("ns_steps", "update_proj_gap", "min_dim")

ENTRIES = [
    Entry("stable_adamw", stax.stable_adamw, dict(learning_rate=3e-2, weight_decay=0.0)),
    Entry("oadamw", stax.oadamw, dict(learning_rate=3e-2, weight_decay=0.0),
          static_args=_STATIC),
    Entry("oadamw_gradient", stax.oadamw,
          dict(learning_rate=3e-2, weight_decay=0.0, muon="gradient"), static_args=_STATIC),
]
