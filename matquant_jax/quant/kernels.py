"""The table of quantizable kernels: the one place that says which weights MatQuant quantizes.

Every decoder layer has five kernels a plan can quantize (spec §5.5): the FFN's gate/up and down
projections and attention's q, kv and output projections. Each row says where the kernel lives
in a layer's parameter tree (`<module>/<name>/w`), its shape in `TransformerConfig` dimensions,
the logical axis of each dimension (sharding), and its contracting axes: MinMax statistics
reduce over them, giving one (α, z) per output channel (spec/models.md §1.3).

Plans, the model's layers, QAT, calibration, the int8 export, serving and the checkpoint
readers' parameter trees all read this table. It lives in `quant` (re-exported by
`models.config`) because plans, which sit below the models, name kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

KINDS = ("ffn", "attn")


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One quantizable weight of a decoder layer.

  Attributes:
    name: its parameter name: the layer's tree holds it at `<module>/<name>/w`.
    kind: the plan scope that quantizes it, "ffn" or "attn".
    module: the layer submodule that owns it, "mlp" or "attn".
    dims: its shape as TransformerConfig field names (an int is a literal size).
    logical_axes: the logical (sharding) axis of each dimension, None for unsharded.
    reduce_axes: the contracting axes; quantization statistics are per output channel.
  """
  name: str
  kind: str
  module: str
  dims: tuple[str | int, ...]
  logical_axes: tuple[str | None, ...]
  reduce_axes: tuple[int, ...]

  @property
  def path(self) -> str:
    """'<module>/<name>/w', relative to a layer."""
    return f"{self.module}/{self.name}/w"

  def shape(self, config) -> tuple[int, ...]:
    """The kernel's shape for a TransformerConfig (or anything with its size fields)."""
    return tuple(d if isinstance(d, int) else getattr(config, d) for d in self.dims)

  def stat_shape(self, config) -> tuple[int, ...]:
    """The shape of its α and z: the contracting axes kept as size 1."""
    return tuple(1 if i in self.reduce_axes else s for i, s in enumerate(self.shape(config)))


# In per-kernel plan entry order (kind by kind, as KINDS lists them).
KERNELS = (
    # [2, D, F]: [0] = gate (the activated half), [1] = up.
    Kernel("gating_einsum", "ffn", "mlp", (2, "embed_dim", "hidden_dim"),
           (None, "embed", "mlp"), (1,)),
    # [F, D]: the down projection.
    Kernel("linear", "ffn", "mlp", ("hidden_dim", "embed_dim"), ("mlp", "embed"), (0,)),
    # [N, D, H]: per (head, head_dim) output channel.
    Kernel("q_einsum", "attn", "attn", ("num_heads", "embed_dim", "head_dim"),
           ("heads", "embed", "head_dim"), (1,)),
    # [2, K, D, H]: [0] = key, [1] = value.
    Kernel("kv_einsum", "attn", "attn", (2, "num_kv_heads", "embed_dim", "head_dim"),
           (None, "kv_heads", "embed", "head_dim"), (2,)),
    # [N, H, D]: per output feature.
    Kernel("attn_vec_einsum", "attn", "attn", ("num_heads", "head_dim", "embed_dim"),
           ("heads", "head_dim", "embed"), (0, 1)),
)

BY_NAME = {k.name: k for k in KERNELS}


def of_kinds(kinds: Iterable[str]) -> tuple[Kernel, ...]:
  """The kernels of these kinds, in table order."""
  kinds = frozenset(kinds)
  unknown = kinds - set(KINDS)
  if unknown:
    raise ValueError(f"unknown kernel kind(s) {sorted(unknown)}; kinds are {KINDS}.")
  return tuple(k for k in KERNELS if k.kind in kinds)


def lookup(path: str) -> Kernel | None:
  """The kernel a '/'-joined param path ends in (`.../<module>/<name>/w` or
  `.../<module>/<name>`), or None for any other parameter."""
  parts = path.split("/")
  if parts and parts[-1] == "w":
    parts = parts[:-1]
  if len(parts) < 2:
    return None
  k = BY_NAME.get(parts[-1])
  return k if k is not None and parts[-2] == k.module else None
