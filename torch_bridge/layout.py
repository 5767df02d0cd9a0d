"""The torch layout adapter: the matrix view of a torch parameter, for every matrix transform.

torch stores ``Linear`` weights ``(out, in)`` and conv weights ``(out, in, kh, kw)``, where JAX
kernels are ``(in, out)``. :func:`torch_dimension_numbers` gives each parameter its
:class:`stax.MatrixDimensionNumbers` (which is optax's ``MuonDimensionNumbers``), so the same
adapter serves ``optax.contrib.muon``, ``stax.oadamw`` and ``stax.scao`` through the bridge's
``layout_kwarg`` (:class:`torch_bridge.Optimizer`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["torch_dimension_numbers", "ModuleLayout"]


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


def _stored_in_out(module: torch.nn.Module) -> bool:
  """Whether ``module`` is a Hugging Face ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``):
  a linear layer whose weight is stored ``(in, out)`` (``nf`` outputs), not torch's
  ``(out, in)``. Recognised by its class name and ``nf``, so transformers need not be
  imported."""
  w = getattr(module, "weight", None)
  return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.ndim == 2
          and w.shape[-1] == getattr(module, "nf", None))


class ModuleLayout:
  """:func:`torch_dimension_numbers` for the parameters of a model, knowing its modules: the
  weight of every Hugging Face ``Conv1D`` (GPT-2's ``c_fc``, ``c_proj``, ``c_attn``, stored
  ``(in, out)``) is read with fan-in axis 0 and output axis 1 (``c_attn`` still as three
  matrices). A name alone cannot tell them from ``nn.Linear`` weights (``(out, in)``, and
  named ``c_fc``/``c_proj`` in other models), so :func:`torch_dimension_numbers` knows only
  ``c_attn``; the drop-ins built from an ``nn.Module`` use this one (a wrong orientation swaps
  a matrix's fan-in and fan-out: Muon's ``shape_scale="original"`` scaled GPT-2's ``c_fc``
  updates by 1 instead of 2). Pass it as ``layout_fn`` to :class:`torch_bridge.Optimizer`.

  Args:
    model: the ``nn.Module`` whose ``named_parameters()`` names the optimizer sees.

  Example:
    >>> import torch
    >>> class Conv1D(torch.nn.Module):   # transformers.pytorch_utils.Conv1D's layout
    ...   def __init__(self, nf, nx):
    ...     super().__init__()
    ...     self.nf, self.weight = nf, torch.nn.Parameter(torch.zeros(nx, nf))
    >>> layout = ModuleLayout(torch.nn.ModuleDict({"c_fc": Conv1D(32, 8)}))
    >>> layout((8, 32), "c_fc.weight")
    MatrixDimensionNumbers(reduction_axis=0, output_axis=1)
    >>> layout((32, 8), "other.weight")
    MatrixDimensionNumbers(reduction_axis=1, output_axis=0)
  """

  def __init__(self, model: torch.nn.Module):
    self.in_out = frozenset(f"{name}.weight" if name else "weight"
                            for name, module in model.named_modules()
                            if _stored_in_out(module))

  def __call__(self, shape: Sequence[int], name: str = "") -> Any:
    dn = torch_dimension_numbers(shape, name)
    if dn is None or str(name).replace("/", ".") not in self.in_out:
      return dn
    from stax.layout import MatrixDimensionNumbers  # pylint: disable=g-import-not-at-top
    return MatrixDimensionNumbers(0, 1, output_groups=getattr(dn, "output_groups", 1))

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, ModuleLayout) and other.in_out == self.in_out

  def __hash__(self) -> int:
    return hash(self.in_out)

  def __repr__(self) -> str:
    return f"ModuleLayout({sorted(self.in_out)})"
