r"""The ``"xla"`` implementation of the fused TurboAdam update: the unfused definition.

The storage's ``read`` (decode v and the UState m), the Adam core's step and the storage's
``write`` (re-encode), on the whole tensor: :func:`stax.codecs.base.read_step_write`. This is the
oracle the Pallas kernel is checked against, and exactly what the optimizer computes without a
kernel, so selecting it changes nothing bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax

from stax.codecs.base import read_step_write

__all__ = ["turbo_update_reference"]


def turbo_update_reference(storage: Any, g: jax.Array, step: Any, ctx: Any
                           ) -> tuple[jax.Array, Any, Any]:
  """``(update, mu_enc, nu_enc)`` of one leaf, read → step → write on the whole tensor."""
  out, mu_enc, nu_enc = read_step_write(storage, g, step, ctx)
  return out.update, mu_enc, nu_enc
