"""Contract-registry entries for OAdamW (both Muon modes) and StableAdamW."""

import stax
from tests.registry import ROW_VIEW_DEPENDENT, Entry

_STATIC = ("ns_steps", "update_proj_gap", "min_dim", "muon_momentum_bits", "codec",
           "min_compress_elements")

ENTRIES = [
    Entry("stable_adamw", stax.stable_adamw, dict(learning_rate=3e-2, weight_decay=0.0)),
    Entry("oadamw", stax.oadamw, dict(learning_rate=3e-2, weight_decay=0.0),
          static_args=_STATIC),
    Entry("oadamw_gradient", stax.oadamw,
          dict(learning_rate=3e-2, weight_decay=0.0, muon="gradient"), static_args=_STATIC),
    # low-bit state (issue 17): 8-bit Muon momentum; StableAdamW with the factored codec
    # (min_compress_elements=64 compresses every matrix of the contract problems)
    Entry("oadamw_m8", stax.oadamw, dict(learning_rate=3e-2, weight_decay=0.0,
                                         muon_momentum_bits=8, min_compress_elements=64),
          static_args=_STATIC, **ROW_VIEW_DEPENDENT),
    Entry("stable_adamw_factored", stax.stable_adamw,
          dict(learning_rate=3e-2, weight_decay=0.0, codec="factored", min_compress_elements=64),
          static_args=("codec", "min_compress_elements"), **ROW_VIEW_DEPENDENT),
]
