"""Contract-registry entries for stax.turbo_adam."""

import numpy as np

import stax
from tests.registry import Entry

_STATIC = ("block_size", "v_bits", "compress_m", "compress_v", "min_compress_elements", "codec",
           "seed", "m_block_size")
# min_compress_elements=64 compresses every matrix of the contract problems (the biases stay
# float32); block_size=4 divides every last axis (16, 8, 4), so no row needs padding.
_COMMON = dict(learning_rate=3e-2, block_size=4, min_compress_elements=64)
# The faithful codec takes a Python-float beta's bias corrections from its double-precision
# log (the seed's), inject_hyperparams hands it a float32 array: for the plain and injected
# runs to be the same optimizer, its betas are float32 numbers (0.999 itself is 1.3e-8 away
# from float32(0.999), which moves the bias corrections by 7e-6 and, through the stochastic
# rounding's near-ties, a few codes).
_F32_BETAS = dict(b1=float(np.float32(0.9)), b2=float(np.float32(0.999)))

ENTRIES = [
    Entry("turbo_adam_faithful", stax.turbo_adam,
          dict(_COMMON, **_F32_BETAS, codec="turboadam-0.2"), static_args=_STATIC),
    Entry("turbo_adam", stax.turbo_adam, dict(_COMMON, codec="stax"), static_args=_STATIC),
    Entry("turbo_adam_factored", stax.turbo_adam, dict(_COMMON, codec="factored"),
          static_args=_STATIC),
]
