"""`PackedWeight`: one quantized kernel as packed r-bit codes plus α', z' per output channel.

A PackedWeight lives in the model's params tree in place of the float kernel `w`; the `Einsum`
layer (models/layers.py) sees the `is_serving_weight` marker and calls `.einsum`, which runs
the packed matmul (matmul.py) instead of the float einsum. Layouts and formats are documented
in layouts.py.

Invariants:
  * `data` holds the codes of Q[K, N] in format `fmt`: ("int4",) one jnp.int4 [K, N] array of
    idx − 8; ("u8",) one uint8 [K, N] array of idx; ("planes",) one uint8 [Kp / p_k, N] array
    per plane of `widths`.
  * `scale` α' and `zero` z' are float32 [N]; ŵ = α'·(idx − z') equals the checkpoint's
    α·(S(q, r) − z) exactly.
  * Static fields (shapes, widths, bit-widths, the kernel path) are pytree metadata, so a
    PackedWeight passes through jit like its arrays, and changing the path retraces.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

from matquant_jax.serving import layouts

Array = jax.Array


@functools.lru_cache(maxsize=None)
def int4_packed_in_memory(platform: str) -> bool:
  """Whether `platform` stores jnp.int4 arrays at 4 bits per element (measured, not assumed).

  XLA packs int4 buffers on GPU and TPU; the CPU client keeps one byte per element, where the
  "int4" format would save nothing and the "planes" format is used instead.
  """
  try:
    device = jax.devices(platform)[0]
  except RuntimeError:
    return False
  probe = jax.device_put(np.zeros((1024,), ml_dtypes.int4), device)
  return resident_nbytes(probe) < 1024


def resident_nbytes(x: Any) -> int:
  """Device bytes of every array leaf of `x` (its buffers' on-device sizes, all shards)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(x):
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        try:
          total += int(shard.data.on_device_size_in_bytes())
        except Exception:  # pylint: disable=broad-except
          # Some runtimes do not report buffer sizes; the logical size is the next best thing.
          total += int(shard.data.size * shard.data.dtype.itemsize)
    elif hasattr(leaf, "nbytes"):
      total += int(leaf.nbytes)
  return total


def choose_format(sw: int, platform: str, fmt: str = "auto") -> str:
  """The storage format for `sw`-bit codes on `platform` (rules in layouts.py)."""
  if fmt == "auto":
    if sw == 8:
      return "u8"
    if sw == 4 and int4_packed_in_memory(platform):
      return "int4"
    return "planes"
  if fmt not in layouts.FORMATS:
    raise ValueError(f"unknown serving format {fmt!r}: valid formats are 'auto', "
                     f"{', '.join(repr(f) for f in layouts.FORMATS)}.")
  if fmt == "int4" and sw > 4:
    raise ValueError(f"format 'int4' holds at most 4-bit codes, but these codes need {sw} bits "
                     f"(extra precision adds one); use 'planes' or 'auto'.")
  return fmt


@struct.dataclass
class PackedWeight:
  """A quantized kernel packed for serving (see the module docstring for the invariants).

  Attributes:
    data: the packed codes (tuple of arrays; layout set by `fmt` and `widths`).
    scale: α' [N] float32.
    zero: z' [N] float32, in index units.
    kernel_shape: the float kernel's shape (config.py layout).
    contract_axes: the kernel's contracting axes (quant/kernels.py).
    fmt: "int4", "u8" or "planes".
    widths: plane widths for "planes"; (4,) for "int4"; (8,) for "u8".
    bits: the slice width r of the plan.
    parent_bits: the checkpoint's code width c.
    extra_precision: whether this is an extra-precision slice (stored at r + 1 bits).
    path: which matmul implementation to use ("auto" lets the guard decide, matmul.PATHS).
    interpret: run Pallas kernels in interpret mode (CPU tests).
  """
  data: tuple[Array, ...]
  scale: Array
  zero: Array
  kernel_shape: tuple[int, ...] = struct.field(pytree_node=False)
  contract_axes: tuple[int, ...] = struct.field(pytree_node=False)
  fmt: str = struct.field(pytree_node=False)
  widths: tuple[int, ...] = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)
  parent_bits: int = struct.field(pytree_node=False, default=8)
  extra_precision: bool = struct.field(pytree_node=False, default=False)
  path: str = struct.field(pytree_node=False, default="auto")
  interpret: bool = struct.field(pytree_node=False, default=False)

  # Duck-typed marker read by models/layers.Einsum (which must not import this package).
  is_serving_weight = True

  @property
  def k(self) -> int:
    """Contracting size K."""
    return math.prod(self.kernel_shape[a] for a in self.contract_axes)

  @property
  def n(self) -> int:
    """Output channels N."""
    return math.prod(self.kernel_shape) // self.k

  @property
  def kp(self) -> int:
    """K padded for packing (K itself for unpacked formats)."""
    return layouts.padded_rows(self.k, self.widths) if self.fmt == "planes" else self.k

  @property
  def storage_bits(self) -> int:
    return layouts.storage_bits(self.bits, self.parent_bits, self.extra_precision)

  @property
  def code_offset(self) -> int:
    """What was subtracted from idx before storing (8 for signed int4, else 0)."""
    return 8 if self.fmt == "int4" else 0

  @property
  def nbytes(self) -> int:
    """Device bytes held (codes, α', z')."""
    return resident_nbytes((self.data, self.scale, self.zero))

  @property
  def code_nbytes(self) -> int:
    """Device bytes of the codes alone."""
    return resident_nbytes(self.data)

  def indices(self) -> Array:
    """idx [K, N] int32 (the r-bit slice indices, in Q's layout)."""
    if self.fmt == "planes":
      return layouts.unpack_planes(self.data, self.widths, self.k)
    return self.data[0].astype(jnp.int32) + self.code_offset

  def dequantize(self, dtype: Any = jnp.float32) -> Array:
    """ŵ = α'(idx − z') in the kernel's own layout, computed in float32 then cast."""
    w = self.scale * (self.indices().astype(jnp.float32) - self.zero)
    return layouts.matrix_to_kernel(w, self.kernel_shape, self.contract_axes).astype(dtype)

  def with_path(self, path: str = "auto", interpret: bool = False) -> PackedWeight:
    """The same weight with another matmul path (static: jitted callers retrace)."""
    from matquant_jax.serving import matmul  # deferred: matmul imports this module
    if path not in ("auto",) + matmul.PATHS:
      raise ValueError(f"unknown matmul path {path!r}: valid paths are 'auto', "
                       f"{', '.join(repr(p) for p in matmul.PATHS)}.")
    return self.replace(path=path, interpret=bool(interpret))

  def einsum(self, eqn: str, x: Array, quant: Any = None) -> Array:
    """`jnp.einsum(eqn, x, w)` computed from the packed codes; result in x's dtype.

    Args:
      eqn: the layer's einsum, e.g. "BTD,CDF->CBTF"; the kernel is the second operand.
      x: the activations.
      quant: the layer's planned WeightQuant (or None). When given it must agree with this
        weight's width, so a model built for one plan cannot silently run another's weights.
    """
    if quant is not None:
      same_ep = quant.extra_precision == self.extra_precision or self.bits == self.parent_bits
      if quant.bits != self.bits or not same_ep:
        raise ValueError(
            f"the model's plan serves this kernel at {quant.bits} bits"
            f"{' (extra precision)' if quant.extra_precision else ''}, but its packed weights "
            f"hold {self.bits}-bit{' extra-precision' if self.extra_precision else ''} codes; "
            f"build the serving params and the model from the same plan.")
    from matquant_jax.serving import matmul
    return matmul.packed_einsum(eqn, x, self)


def pack_kernel(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, *,
                contract_axes: Sequence[int], bits: int, parent_bits: int = 8,
                extra_precision: bool = False, fmt: str = "auto",
                device: jax.Device | None = None) -> PackedWeight:
  """Slices c-bit parent codes to r bits on the host, packs them and puts them on `device`.

  Args:
    codes: parent codes, uint8, in the kernel's layout (config.py).
    scale, zero: the parent α, z (float32, size 1 on the contracting axes).
    contract_axes: the kernel's contracting axes.
    bits: the slice width r; parent_bits: the parent width c.
    extra_precision: keep the unclamped extra bucket (stored at r + 1 bits).
    fmt: "auto" (layouts.py rules for the device's platform) or a format name.
    device: where the packed arrays go (default: the first device).

  Returns:
    The PackedWeight; the host arrays built here are dropped on return.
  """
  device = device or jax.devices()[0]
  codes = np.asarray(codes)
  contract_axes = tuple(int(a) for a in contract_axes)
  extra_precision = bool(extra_precision) and bits < parent_bits
  sw = layouts.storage_bits(bits, parent_bits, extra_precision)
  fmt = choose_format(sw, device.platform, fmt)
  idx = layouts.kernel_to_matrix(
      layouts.slice_index_np(codes, bits, parent_bits, extra_precision=extra_precision),
      contract_axes)
  # Powers of two: both rescalings are exact in float32 (see layouts.py).
  shift = 2.0 ** (parent_bits - bits)
  alpha = layouts.channel_vector(scale) * np.float32(shift)
  z = layouts.channel_vector(zero) / np.float32(shift)
  if fmt == "int4":
    data = ((idx.astype(np.int8) - 8).astype(ml_dtypes.int4),)
    widths = (4,)
  elif fmt == "u8":
    data = (idx.astype(np.uint8),)
    widths = (8,)
  else:
    widths = layouts.plane_widths(sw)
    data = layouts.pack_planes_np(idx, widths)
  put = lambda a: jax.device_put(a, device)
  return PackedWeight(
      data=tuple(put(a) for a in data), scale=put(alpha), zero=put(z),
      kernel_shape=tuple(int(s) for s in codes.shape), contract_axes=contract_axes, fmt=fmt,
      widths=tuple(widths), bits=int(bits), parent_bits=int(parent_bits),
      extra_precision=extra_precision)


def is_packed(x: Any) -> bool:
  return isinstance(x, PackedWeight)


_PATH_FORMAT = {"xla_int4": "int4", "xla_u8": "u8", "xla_unpack": "planes",
                "pallas_gpu": "planes", "pallas_tpu": "planes"}


def set_path(tree: Any, path: str = "auto", interpret: bool = False) -> Any:
  """PackedWeights in `tree` switched to matmul `path` (e.g. to force a kernel in tests).

  Only weights stored in the format the path reads are switched (e.g. "pallas_gpu" leaves the
  int8 "u8" kernels of a Mix'n'Match plan on their own path); the rest keep theirs.
  """
  def switch(x):
    if not is_packed(x):
      return x
    if path != "auto" and _PATH_FORMAT.get(path, x.fmt) != x.fmt:
      return x
    return x.with_path(path, interpret)

  return jax.tree_util.tree_map(switch, tree, is_leaf=is_packed)
