"""Explicit-mesh sharding helpers shared by the kernels, transforms and codecs.

An array is *explicitly sharded* when its type (``jax.typeof(x).sharding``) is a
``NamedSharding`` over a mesh with ``AxisType.Explicit`` axes and its spec names one of them.
Inside ``jit`` that holds both under ``jax.set_mesh`` and when the arguments were merely
``device_put`` with a ``NamedSharding`` on an explicit mesh (no mesh context). A bare
``PartitionSpec`` given to ``jax.reshard`` or to an ``out_sharding=`` is only accepted under a
mesh context, so every sharding here is built on the array's *own* (abstract) mesh with
:func:`named`; that works in both cases.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["explicit_spec", "mesh_of", "explicit_axes", "named", "reshard", "axis_size"]


def _mesh(x: Any):
  # A concrete array's own (concrete) mesh: an eager reshard needs its devices. Inside jit, the
  # abstract mesh of the type.
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return jax.typeof(x).sharding.mesh


def mesh_of(x: Any):
  """The mesh of ``x``'s sharding, or ``None`` (no array, no mesh): concrete for a concrete
  array, abstract inside ``jit``."""
  try:
    mesh = _mesh(x)
  except Exception:  # noqa: BLE001 - not an array / no sharding in types
    return None
  return None if mesh is None or getattr(mesh, "empty", True) else mesh


def explicit_axes(mesh: Any) -> tuple[str, ...]:
  """Names of the ``Explicit`` axes of ``mesh`` (``()`` for ``None``, Auto or Manual meshes)."""
  if mesh is None:
    return ()
  return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)


def _names(entry: Any) -> tuple:
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def explicit_spec(x: Any) -> Optional[tuple]:
  """The full-rank spec tuple of ``x`` when some axis is sharded over an *explicit* mesh axis,
  else ``None`` (unsharded, replicated, Auto mesh, ``pmap``, abstract values)."""
  mesh = mesh_of(x)
  explicit = set(explicit_axes(mesh))
  if not explicit:
    return None
  spec = tuple(jax.typeof(x).sharding.spec)
  spec = spec + (None,) * (len(x.shape) - len(spec))
  if not any(set(_names(e)) & explicit for e in spec):
    return None
  return spec


def named(ref: Any, spec: Sequence[Any]) -> NamedSharding:
  """``NamedSharding(mesh, P(*spec))`` on ``ref``'s mesh (``ref``: a mesh or an array)."""
  mesh = ref if isinstance(ref, (Mesh, AbstractMesh)) else _mesh(ref)
  return NamedSharding(mesh, P(*spec))


def reshard(x: jax.Array, spec: Sequence[Any], like: Any = None) -> jax.Array:
  """``jax.reshard`` of ``x`` to ``spec`` on the mesh of ``like`` (default: ``x``'s own)."""
  return jax.reshard(x, named(x if like is None else like, spec))


def replicated(x: jax.Array) -> jax.Array:
  """``x`` replicated on its explicit mesh (itself when no explicit axis shards it)."""
  if explicit_spec(x) is None:
    return x
  return reshard(x, (None,) * len(x.shape))


def axis_size(mesh: Any, entry: Any) -> int:
  """Number of shards of one spec entry (``None``, an axis name or a tuple of names)."""
  return math.prod(int(mesh.shape[n]) for n in _names(entry))
