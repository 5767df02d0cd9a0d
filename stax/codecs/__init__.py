"""How a moment tensor is stored: full precision, quantised, compressed.

Example:
  >>> import jax.numpy as jnp, stax
  >>> from stax import codecs
  >>> storage = codecs.SeparateStorage(codecs.BlockSignedCodec(4, 32), codecs.LogQuantCodec(4, 128))
  >>> params = {"w": jnp.zeros((8, 128))}
  >>> state = stax.scale_by_adam(storage=storage).init(params)
  >>> codecs.state_bits_per_param(state, params, exclude_scalars=True)  # 4.5 + 4.25 + the key
  8.8125
"""
from stax.codecs.base import (FullPrecision, MomentCodec, MomentStorage, SeparateStorage,
                              StorageBase, StorageStep, as_storage, full_precision_storage,
                              resolve_storage)
from stax.codecs.accounting import state_bits_per_param, state_bytes
from stax.codecs.block_signed import BlockSignedCodec, BlockSignedState
from stax.codecs.factored import Factored, FactoredState
from stax.codecs.log_quant import LogQuantCodec, LogQuantState
from stax.codecs.packing import pack_bits, packed_length, unpack_bits
from stax.codecs.turbo import (STATE_CODECS, TurboAdam02Storage, state_codec_storage,
                               turbo_storage)
from stax.codecs.ustate import UStateM
