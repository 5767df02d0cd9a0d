"""Little-endian n-bit packing along the last axis (TurboAdam 0.2.0's stream format).

Value ``k`` of a row occupies bits ``[k·b, (k+1)·b)`` of the row's little-endian bit stream and
byte ``j`` holds stream bits ``[8j, 8j+8)``. For the widths TurboAdam 0.2.0 uses this is exactly
its format: 2-bit packs 4 values per byte with element 0 in the low bits, 4-bit packs the low
nibble first, 3-bit packs 8 values into 3 bytes, 6-bit packs 4 values into 3 bytes, 8-bit is one
value per byte. Packing happens per row (along the last axis only), so a packed array keeps the
parameter's rank; flattened, it equals the seed's packing of the flattened tensor whenever each
row's bit length is a multiple of 8. On the CPU, 1-, 2- and 4-bit rows that fill whole 32-bit
words are unpacked a little-endian word at a time and packed a byte at a time in ``uint8``
arithmetic (the same bytes, faster loops: :func:`_word_values`).

Example:
  >>> import jax.numpy as jnp
  >>> from stax.codecs.packing import pack_bits, unpack_bits
  >>> codes = jnp.array([[1, 2, 3, 0]], jnp.uint8)
  >>> packed = pack_bits(codes, 2)            # one byte: 1 | 2<<2 | 3<<4 | 0<<6 = 57
  >>> unpack_bits(packed, 2, 4).tolist()
  [[1, 2, 3, 0]]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from stax.codecs._layout import merge_last, pad_last, split_last

__all__ = ["SUPPORTED_BITS", "packed_length", "pack_bits", "unpack_bits"]

SUPPORTED_BITS = (1, 2, 3, 4, 6, 8)


def _group(bits: int) -> tuple[int, int]:
  """(values per group, bytes per group): the smallest whole-byte group."""
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"`bits` must be one of {SUPPORTED_BITS}, got {bits!r}.")
  nbytes = math.lcm(8, bits) // 8
  return nbytes * 8 // bits, nbytes


def packed_length(n: int, bits: int) -> int:
  """Bytes that ``n`` values of ``bits`` bits occupy: ``ceil(n·bits/8)``."""
  _group(bits)
  return -(-n * bits // 8)


def _word_values(n: int, bits: int) -> int:
  """Values per 32-bit word when a row of ``n`` values is unpacked a whole little-endian
  ``uint32`` word at a time, and packed into its bytes by a ``uint8`` sum (0: byte groups in
  ``uint32`` arithmetic, :func:`_group`).

  Whole words where ``bits`` divides 32 and every row fills whole words, on the CPU: there the
  generic path's one-byte groups of 4-bit codes (two values per byte, a minor axis of 2) made
  XLA's loops nearly scalar, and a decode read three times per step (TurboAdam's m) cost more
  than its memory traffic. With words the minor axis holds ``32/bits`` values, the bytes are the
  same (a ``uint32`` is its four bytes in little-endian order, as the stream is), and only the
  arithmetic changes. Measured on one 8192×384 leaf (2-core CPU): a 4-bit decode inside an
  Adam update 3.16 → 1.72 ms, a decode + encode pass 2.57 → 2.30 ms. Packing wants bytes, not
  words: a word's bytes are a narrowing ``bitcast_convert_type``, which XLA:CPU expands into a
  loop of shifts and masks of its own (it fuses no consumer into the words' reduction), so every
  packed array took a second loop and a temporary of its size (stop 56: one kernel of two per
  shape, the 16M steps of TurboAdam's ``"stax"`` codec 118 → 101–107 ms, its faithful one
  176–182 → 157–167 ms). Summed as ``uint8`` each byte's values (the fields do not overlap) are
  one reduction that takes the codes' producer and a gate's select of the old bytes into its
  loop (``tests/test_codecs.py``). Other backends keep byte groups in ``uint32`` (the form the
  Pallas kernels lower)."""
  if bits not in (1, 2, 4) or jax.default_backend() != "cpu":
    return 0
  per_word = 32 // bits
  return per_word if n % per_word == 0 else 0


def _fields(bits: int, values: int) -> jax.Array:
  """The bit offsets of ``values`` fields of ``bits`` bits in a word (uint32)."""
  return jnp.arange(values, dtype=jnp.uint32) * jnp.uint32(bits)


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
  """Packs integer codes ``[..., n]`` (each < 2**bits) into ``uint8[..., ceil(n·bits/8)]``."""
  g, nbytes = _group(bits)
  n = codes.shape[-1]
  out_len = packed_length(n, bits)
  if bits == 8:
    return codes.astype(jnp.uint8)
  ng = -(-n // g)
  if _word_values(n, bits):   # each byte's values summed in uint8: one loop (_word_values)
    x = split_last(pad_last(codes.astype(jnp.uint8), ng * g, 0), (ng, g))
    fields = _fields(bits, g).astype(jnp.uint8)
    return jnp.sum(x << fields, axis=-1, dtype=jnp.uint8)   # rows of whole words: no tail
  x = split_last(pad_last(codes.astype(jnp.uint32), ng * g, 0), (ng, g))
  word = jnp.sum(x << _fields(bits, g), axis=-1, dtype=jnp.uint32)   # fields do not overlap
  by = ((word[..., None] >> _fields(8, nbytes)) & jnp.uint32(0xFF)).astype(jnp.uint8)
  by = merge_last(by, 2)
  return by[..., :out_len] if by.shape[-1] != out_len else by


def unpack_bits(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of :func:`pack_bits`: ``uint8[..., ceil(n·bits/8)] -> uint8[..., n]``."""
  g, nbytes = _group(bits)
  if packed.shape[-1] != packed_length(n, bits):
    raise ValueError(f"packed last axis must have {packed_length(n, bits)} bytes for n={n} "
                     f"at {bits} bits, got {packed.shape[-1]}.")
  if bits == 8:
    return packed.astype(jnp.uint8)
  per_word = _word_values(n, bits)
  if per_word:
    g = per_word
    word = jax.lax.bitcast_convert_type(split_last(packed.astype(jnp.uint8), (n // g, 4)),
                                        jnp.uint32)
  else:
    ng = -(-n // g)
    x = split_last(pad_last(packed.astype(jnp.uint32), ng * nbytes, 0), (ng, nbytes))
    word = jnp.sum(x << _fields(8, nbytes), axis=-1, dtype=jnp.uint32)
  vals = (word[..., None] >> _fields(bits, g)) & jnp.uint32((1 << bits) - 1)
  vals = merge_last(vals.astype(jnp.uint8), 2)
  return vals[..., :n] if vals.shape[-1] != n else vals
