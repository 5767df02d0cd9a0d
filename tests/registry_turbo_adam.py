"""Contract-registry entries for stax.turbo_adam."""

import stax
from tests.registry import Entry

_STATIC = ("block_size", "v_bits", "compress_m", "compress_v", "min_compress_elements", "codec",
           "seed", "m_block_size")
# min_compress_elements=64 compresses every matrix of the contract problems (the biases stay
# float32); block_size=4 divides every last axis (16, 8, 4), so no row needs padding.
_COMMON = dict(learning_rate=3e-2, block_size=4, min_compress_elements=64)

ENTRIES = [
    Entry("turbo_adam_faithful", stax.turbo_adam, dict(_COMMON, codec="turboadam-0.2"),
          static_args=_STATIC),
    Entry("turbo_adam", stax.turbo_adam, dict(_COMMON, codec="stax"), static_args=_STATIC),
]
