"""Block quantisation primitives shared by the fused kernels and their references.

Thin re-exports of the codec functions (which are written in plain ``jax.numpy`` on one block
row at a time, so the same code runs inside a Pallas kernel body and as the XLA reference):

* :func:`log_encode` / :func:`log_decode`: TurboAdam 0.2.0's 1Q log v codec;
* :func:`ustate_encode` / :func:`ustate_decode`: its UState m codec;
* :func:`pack_bits` / :func:`unpack_bits`: little-endian n-bit packing along the last axis;
* :func:`counter_uniform`, :func:`seed_for`: the counter-hash RNG.
"""

from stax.codecs.log_quant import log_decode, log_encode
from stax.codecs.packing import pack_bits, unpack_bits
from stax.codecs.rng import counter_uniform, seed_for
from stax.codecs.ustate import ustate_decode, ustate_encode

__all__ = ["log_encode", "log_decode", "ustate_encode", "ustate_decode", "pack_bits",
           "unpack_bits", "counter_uniform", "seed_for"]
