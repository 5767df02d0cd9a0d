"""How a moment tensor is stored: full precision, quantised, compressed."""
from stax.codecs.base import (FullPrecision, MomentCodec, MomentStorage, SeparateStorage,
                              full_precision_storage, resolve_storage)
