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
  ``(3E, E)``, Hugging Face GPT-2's ``c_attn.weight`` (a ``Conv1D``, stored ``(in, 3·out)``,
  recognised by that shape) and a ``(3E, E)`` weight of a module in :data:`FUSED_QKV_LINEARS`
  (timm's ViT ``qkv``, ``qkv_proj``, ``Wqkv``, ``to_qkv``) get ``output_groups=3``. A name and a shape cannot tell a module's
  type: :class:`ModuleLayout` reads the modules (transposed convs, grouped convs, RNN gates,
  other ``Conv1D`` weights). The bridge calls it per parameter as ``layout_fn(shape, name)``
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
  if (parts[-1] == "weight" and len(parts) > 1 and parts[-2] == "c_attn" and nd == 2
      and shape[1] == 3 * shape[0]):
    # (GPT-2's self-attention c_attn, (E, 3E); another c_attn, a cross-attention's (E, 2E) or
    # GPT-BigCode's nn.Linear (E + 2·kv, E), is read as torch's (out, in): pass ModuleLayout)
    return MatrixDimensionNumbers(0, 1, output_groups=3)
  if (parts[-1] == "weight" and len(parts) > 1 and parts[-2] in FUSED_QKV_LINEARS and nd == 2
      and shape[0] == 3 * shape[1]):
    return MatrixDimensionNumbers(1, 0, output_groups=3)
  red = tuple(range(1, nd))
  return MatrixDimensionNumbers(red if len(red) > 1 else red[0], 0)


#: ``nn.Linear`` modules that fuse q, k and v as three equal blocks of output rows, ``[q; k; v]``
#: (timm's and DINOv2's ViT ``attn.qkv``, Phi-3's ``qkv_proj``, ModernBERT's and MPT's ``Wqkv``,
#: vit-pytorch's ``to_qkv``): a weight ``(3E, E)`` is three ``E × E`` matrices. Only at exactly
#: three times its fan-in: a grouped-query projection (``E + 2·kv`` rows, Phi-3-medium's) is one
#: matrix, as dimension numbers cannot split unequal groups; GPT-NeoX's, Bloom's and Falcon's
#: ``query_key_value`` interleave q, k and v per head, so they are not listed (one matrix).
FUSED_QKV_LINEARS = ("qkv", "qkv_proj", "Wqkv", "to_qkv")


def _stored_in_out(module: torch.nn.Module) -> bool:
  """Whether ``module`` is a Hugging Face ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``):
  a linear layer whose weight is stored ``(in, out)`` (``nf`` outputs), not torch's
  ``(out, in)``. Recognised by its class name and ``nf``, so transformers need not be
  imported."""
  w = getattr(module, "weight", None)
  return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.ndim == 2
          and w.shape[-1] == getattr(module, "nf", None))


def _module_dims(mname: str, module: torch.nn.Module, pname: str, shape: Sequence[int]) -> Any:
  """The matrix view of the parameter ``pname`` (of ``shape``) of ``module`` (named ``mname``)
  where the module's type decides it against :func:`torch_dimension_numbers`'s reading, else
  ``_DEFAULT``."""
  from stax.layout import MatrixDimensionNumbers as D  # pylint: disable=g-import-not-at-top
  nd = len(shape)
  if pname == "weight" and _stored_in_out(module):
    if _last(mname) != "c_attn":
      return D(0, 1)
    # Hugging Face Conv1D (in, out); a c_attn fusing q, k, v (nf = 3·nx) or k, v (2·nx, GPT-2's
    # cross-attention) is that many matrices
    groups = shape[1] // shape[0] if shape[1] % shape[0] == 0 and shape[1] // shape[0] in (2, 3) \
        else 1
    return D(0, 1, output_groups=groups)
  if pname == "weight" and isinstance(module, torch.nn.modules.conv._ConvTransposeNd) and nd >= 3:
    # (in, out/groups, *kernel): fan-in is in·kernel, fan-out the output channels (torch's
    # transposed conv is the adjoint of the conv with this weight); groups > 1 is left one
    # matrix (its groups split the fan-in axis, which dimension numbers cannot say)
    return D((0,) + tuple(range(2, nd)), 1)
  if pname == "weight" and isinstance(module, torch.nn.modules.conv._ConvNd) and nd >= 3:
    groups = int(getattr(module, "groups", 1))
    red = tuple(range(1, nd))
    if groups > 1 and shape[0] % groups == 0:
      # (out, in/groups, *kernel): the groups are independent (out/groups) × (in/groups·kernel)
      # matrices (depthwise: 1 × kernel each)
      return D(red, 0, output_groups=groups)
    return _DEFAULT
  if pname == "weight" and isinstance(module, torch.nn.Linear) and _last(mname) == "c_attn":
    return D(1, 0)   # (GPT-BigCode's c_attn is an nn.Linear: torch's (out, in), one matrix)
  if isinstance(module, (torch.nn.RNNBase, torch.nn.RNNCellBase)) and nd == 2 and (
      pname.startswith("weight_ih") or pname.startswith("weight_hh")):
    # the gates stacked along the output axis: LSTM i|f|g|o, GRU r|z|n, separate matrices
    mode = getattr(module, "mode", type(module).__name__.upper())
    gates = 4 if "LSTM" in mode else 3 if "GRU" in mode else 1
    if shape[0] % gates == 0:
      return D(1, 0, output_groups=gates)
  return _DEFAULT


_DEFAULT = object()


def _stored_tensors(mname: str, module: torch.nn.Module) -> list:
  """``(full name, tensor name, shape, direction)`` of each parameter that stores one of
  ``module``'s own tensors: its plain parameters (``weight``: ``weight``), and those a
  reparametrisation stores in their place, under the tensor they stand for:

  * ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ``orthogonal``,
    ``spectral_norm``): ``parametrizations.<tensor>.original`` (or ``original0``,
    ``original1``, ...), owned by a ``ParametrizationList``; the largest of them is the tensor
    itself (weight norm's direction ``v``), the others (its magnitude ``g``) are no matrices;
  * the older ``torch.nn.utils.weight_norm`` (``weight_v`` and ``weight_g``) and
    ``spectral_norm`` (``weight_orig``) hooks.

  ``direction`` is False for a magnitude. (Without this, a weight-normed transposed conv,
  grouped conv or LSTM had the layout of a plain ``(out, in)`` weight: HiFi-GAN's and
  EnCodec's transposed convs, wav2vec2's grouped positional conv.)"""
  prefix = f"{mname}." if mname else ""
  if isinstance(module, _PARAMETRIZATION_LIST):
    return []                       # its originals are named under their owner, below
  out = []
  renamed: dict = {}
  for hook in getattr(module, "_forward_pre_hooks", {}).values():
    kind, name = type(hook).__name__, getattr(hook, "name", None)
    if kind == "WeightNorm" and name:
      renamed[f"{name}_v"], renamed[f"{name}_g"] = (name, True), (name, False)
    elif kind == "SpectralNorm" and name:
      renamed[f"{name}_orig"] = (name, True)
  for pname, p in module.named_parameters(recurse=False):
    tname, direction = renamed.get(pname, (pname, True))
    out.append((prefix + pname, tname, tuple(p.shape), direction))
  lists = getattr(module, "parametrizations", None)
  if isinstance(lists, torch.nn.ModuleDict):
    for tname, plist in lists.items():
      originals = list(plist.named_parameters(recurse=False))
      if not originals:
        continue
      biggest = max(originals, key=lambda kv: kv[1].numel())[1]
      for oname, p in originals:
        out.append((f"{prefix}parametrizations.{tname}.{oname}", tname, tuple(p.shape),
                    p is biggest))
  return out


try:
  from torch.nn.utils.parametrize import ParametrizationList as _PARAMETRIZATION_LIST
except ImportError:   # pragma: no cover - torch without parametrize
  class _PARAMETRIZATION_LIST:   # pylint: disable=invalid-name
    pass


def _last(dotted: str) -> str:
  return dotted.rsplit(".", 1)[-1]


class ModuleLayout:
  """:func:`torch_dimension_numbers` for the parameters of a model, knowing its modules' types:

  * Hugging Face ``Conv1D`` weights (GPT-2's ``c_fc``, ``c_proj``, ``c_attn``) are stored
    ``(in, out)``: fan-in axis 0, output axis 1; a ``c_attn`` is three matrices (q, k, v) or
    two (k, v: GPT-2's cross-attention). An ``nn.Linear`` named ``c_attn`` (GPT-BigCode) is
    torch's ``(out, in)``, one matrix. (A name alone cannot tell them apart: CLIP-style models
    name Linears ``c_fc``.)
  * transposed convs, weight ``(in, out/groups, *kernel)``: fan-in ``in·kernel``, fan-out axis 1
    (read as a conv's ``(out, in, ...)`` the fan-in and fan-out were swapped: Muon's step on a
    ``ConvTranspose2d(8, 16, 3)`` weight was 0.25 off that on its equivalent conv's weight);
  * grouped and depthwise convs (``groups > 1``): ``groups`` separate matrices
    (``output_groups``), not one that mixes independent filters;
  * ``nn.LSTM``/``nn.GRU`` (and their cells): ``weight_ih*``/``weight_hh*`` stack the gates
    (4 for LSTM, 3 for GRU) along the output axis: that many matrices.

  With ``embeddings=False`` the ``nn.Embedding``/``nn.EmbeddingBag`` weights, whatever their
  names, are not matrices (``None``: vectors to every matrix transform); the OAdamW drop-in
  keeps them out of Muon so (T5's ``shared``, a word-LM's ``encoder``: its default path
  predicates know only names such as ``embed``/``wte``). The drop-ins built from an
  ``nn.Module`` use this layout; pass it as ``layout_fn`` to :class:`torch_bridge.Optimizer`
  (given a model, it does so itself).

  Args:
    model: the ``nn.Module`` whose ``named_parameters()`` names the optimizer sees.
    embeddings: whether embedding tables are matrices (default True: TurboAdam's factored v
      and SCAO treat them as such).

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
    >>> ModuleLayout(torch.nn.LSTM(4, 8))((32, 4), "weight_ih_l0").output_groups
    4
  """

  def __init__(self, model: torch.nn.Module, *, embeddings: bool = True):
    dims = {}
    for mname, module in model.named_modules():
      for full, tname, shape, direction in _stored_tensors(mname, module):
        d = _module_dims(mname, module, tname, shape) if direction else None
        if d is not _DEFAULT:
          dims[full] = d
        if (not embeddings and tname == "weight"
            and isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))):
          dims[full] = None
    self.dims = tuple(sorted(dims.items()))
    self._by_name = dict(self.dims)

  def __call__(self, shape: Sequence[int], name: str = "") -> Any:
    d = self._by_name.get(str(name).replace("/", "."), _DEFAULT)
    return torch_dimension_numbers(shape, name) if d is _DEFAULT else d

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, ModuleLayout) and other.dims == self.dims

  def __hash__(self) -> int:
    return hash(self.dims)

  def __repr__(self) -> str:
    return f"ModuleLayout({len(self.dims)} module-typed weights)"
