"""The torch layout adapter: the matrix view of a torch parameter, for every matrix transform.

torch stores ``Linear`` weights ``(out, in)`` and conv weights ``(out, in, kh, kw)``, where JAX
kernels are ``(in, out)``. :func:`torch_dimension_numbers` gives each parameter its
:class:`stax.MatrixDimensionNumbers` (which is optax's ``MuonDimensionNumbers``), so the same
adapter serves ``optax.contrib.muon``, ``stax.oadamw`` and ``stax.scao`` through the bridge's
``layout_kwarg`` (:class:`torch_bridge.Optimizer`).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["torch_dimension_numbers"]


def torch_dimension_numbers(shape: Sequence[int], name: str = "") -> Any:
  """The matrix view of a torch parameter: :class:`stax.MatrixDimensionNumbers` (which is
  optax's ``MuonDimensionNumbers``, so ``optax.contrib.muon`` takes it too), or ``None``.

  Output axis 0, fan-in axes 1..ndim-1 (``Linear`` ``(out, in)``, conv ``(out, in, kh, kw)``);
  ``None`` below 2-D (biases, norms). With the parameter's dotted ``name``, fused attention
  projections are three matrices, q, k and v: ``nn.MultiheadAttention``'s ``in_proj_weight``
  ``(3E, E)`` and Hugging Face GPT-2's ``c_attn.weight`` (a ``Conv1D``, stored ``(in, 3·out)``)
  get ``output_groups=3``. The bridge calls it per parameter as ``layout_fn(shape, name)``
  (see ``layout_kwarg``).

  Example:
    >>> torch_dimension_numbers((64, 3, 3, 3))
    MatrixDimensionNumbers(reduction_axis=(1, 2, 3), output_axis=0)
    >>> torch_dimension_numbers((96, 32), "attn.in_proj_weight").output_groups
    3
  """
  from stax.layout import MatrixDimensionNumbers  # pylint: disable=g-import-not-at-top
  nd = len(shape)
  if nd < 2:
    return None
  parts = str(name).replace("/", ".").rsplit(".", 2)
  if parts[-1] == "in_proj_weight" and nd == 2:
    return MatrixDimensionNumbers(1, 0, output_groups=3)
  if parts[-1] == "weight" and len(parts) > 1 and parts[-2] == "c_attn" and nd == 2:
    return MatrixDimensionNumbers(0, 1, output_groups=3)
  red = tuple(range(1, nd))
  return MatrixDimensionNumbers(red if len(red) > 1 else red[0], 0)
