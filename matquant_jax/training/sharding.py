"""Device meshes and logical-axis sharding rules for pjit-style training.

Parameters carry logical axis names ('vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp');
rules map them onto mesh axes ('data', 'fsdp', 'tensor'). The batch is split over ('data',
'fsdp'); parameters are split over 'fsdp' (ZeRO-3 style) and 'tensor' (Megatron style). A
dimension a mesh axis does not divide is replicated instead of failing deep inside XLA
(tiny models on 8 devices, 2 KV heads on a tensor axis of 4), and the fallback is reported.

Meshes use explicit `Mesh(devices, names)`: jax 0.10's `make_mesh` defaults to Explicit axis
types, which breaks ordinary sharded code.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes) pairs, first match wins (flax.linen.logical_to_mesh_axes).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("seq", None),
    ("layers", None),  # the stacked (scanned) layer axis: every device holds all layers' shards
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 (all remaining devices).

  Raises ValueError when the sizes do not multiply to the device count.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  sizes = [data, fsdp, tensor]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive (or -1).")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f"{n} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}: "
                       f"{n} is not a multiple of {known}.")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"but {n} are available; adjust mesh sizes (one may be -1).")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> tuple[P, list[str]]:
  """Drops mesh axes from dimensions they do not divide; returns the spec and what it dropped."""
  out, dropped = [], []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    kept = []
    size = 1
    for a in names:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
      else:
        dropped.append(f"{a} (dim {dim})")
    out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*out), dropped


def param_shardings(logical_specs, shapes, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """NamedShardings for a param tree from its logical PartitionSpecs and its shapes.

  Returns (shardings, notes) where notes lists the dimensions replicated because a mesh axis
  did not divide them.
  """
  notes = []

  def one(path, spec, shape):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
    fitted, dropped = _fit_spec(mesh_spec, shape.shape, mesh)
    if dropped:
      notes.append(f"{jax.tree_util.keystr(path)}: replicated over {', '.join(dropped)}")
    return NamedSharding(mesh, fitted)

  shardings = jax.tree_util.tree_map_with_path(
      one, logical_specs, shapes, is_leaf=lambda x: isinstance(x, P))
  return shardings, notes


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
  """[batch, seq] arrays: batch over the data-parallel axes, sequence replicated."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "seq"), rules))


def data_parallel_size(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> int:
  """How many ways the batch dimension is split."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
  names = spec if isinstance(spec, tuple) else ((spec,) if spec else ())
  return int(np.prod([mesh.shape[a] for a in names])) if names else 1


def _dict_keys(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings_like_params(abstract_state, abstract_params, param_shardings, mesh: Mesh):
  """Shardings for an optimizer state: every leaf shaped like a param is sharded like it.

  Optax keeps per-param moments (Adam's mu and nu, masked or chained) as trees whose dict keys
  end with the param's own path, e.g. `[0].mu['layer_0']['mlp']['linear']['w']`; a leaf is
  matched to the param whose path is the longest such suffix with the same shape. Everything
  else (step counts, scalars) is replicated. Deriving this from the params, not from compiling
  `tx.init`, matters: XLA does not propagate the params' shardings into zero-filled outputs, so
  the moments would come back replicated (3× the params' memory on every device).
  """
  by_path = {}
  for path, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    by_path[_dict_keys(path)] = (a.shape, path)
  shard_by_path = {_dict_keys(p): s for p, s in
                   jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
        return shard_by_path[keys[start:]]
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_state)
