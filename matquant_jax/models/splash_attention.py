"""Attention as the Pallas TPU splash kernel: no [batch, heads, seq, seq] scores in HBM.

The XLA attention of `layers.Attention` materialises the soft-capped, masked, softmaxed scores
([B, N, T, T] in f32, 1 GiB per layer per chip for Gemma-2 9B at sequence 8192) and reads and
writes them several times per layer in the forward, the rematerialised forward and the
backward pass: compiled for TPU v5e, that traffic is most of the train step's HBM bytes. The
splash kernel (jax.experimental.pallas.ops.tpu.splash_attention, the one MaxText uses) keeps
each (query block, key block) tile in VMEM, skips the tiles the causal or sliding-window mask
empties, and recomputes the scores in its backward kernel.

Numerics: the same function as `layers.Attention` without a cache: the query is scaled before
the kernel, the logits are soft-capped before masking (Gemma-2), GQA heads share their key /
value head, tokens attend within their segment. One difference in what it assumes: the mask is
built from *token indices*, not the `positions` input, so positions must count up by one inside
each segment (what `positions_from_segments` and the packed data pipeline produce). Padding
queries (segment 0) attend to earlier padding instead of nothing; they never reach a real token
or the loss.

`SplashAttention` is hashable (a Flax module attribute). With a mesh it runs the kernel under
`shard_map`: batch over the mesh axes of the logical 'batch' axis, heads over those of 'heads';
the sequence must be unsharded. On a backend other than TPU the kernel runs in Pallas' interpret
mode (exact, slow: for tests).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

# Tile edge for every kernel (forward, fused backward): MaxText's default for long sequences.
# Sequences shorter than this use one tile; the kernel needs a multiple of 128 on TPU.
DEFAULT_BLOCK = 512
LANES = 128

# Names the compiled HLO gives the kernels' custom calls (training/aot.py counts them).
FWD_KERNEL = "splash_mha_fwd"
BWD_KERNEL = "splash_mha_dkv"


def check_shapes(seq_len: int, head_dim: int) -> str | None:
  """Why splash cannot run this shape on TPU, or None when it can."""
  if seq_len % LANES:
    return f"sequence length {seq_len} is not a multiple of {LANES} (the kernel's tiles)"
  if head_dim % LANES:
    return f"head_dim {head_dim} is not a multiple of {LANES}"
  return None


def block_size(seq_len: int, block: int = DEFAULT_BLOCK) -> int:
  """The tile edge used for `seq_len`: the largest of block, block/2, ... >= 128 dividing it,
  else the whole sequence (only valid off TPU, where the kernel is interpreted)."""
  b = block
  while b >= LANES:
    if seq_len % b == 0:
      return b
    b //= 2
  return seq_len


def _mask(seq_len: int, window: int | None) -> sm.Mask:
  if window is None:
    return sm.CausalMask((seq_len, seq_len))
  # layers.attention_mask keeps key k for query q iff q - window < k <= q.
  return sm.LocalMask((seq_len, seq_len), window_size=(window - 1, 0), offset=0)


# Not cached: the kernel holds its block-mask tables as arrays, which made under one trace are
# that trace's values (a cached kernel would leak them into the next trace).
def _kernel(seq_len: int, heads: int, window: int | None, softcap: float | None, block: int,
            interpret: bool):
  b = block_size(seq_len, block)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
  mask = sm.MultiHeadMask([_mask(seq_len, window)] * heads)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            attn_logits_soft_cap=softcap, interpret=interpret)


def visible_tiles(seq_len: int, window: int | None, block: int = DEFAULT_BLOCK) -> int:
  """(query tile, key tile) pairs the kernel computes: those the mask does not empty."""
  b = block_size(seq_len, block)
  n = seq_len // b
  first = np.arange(n) * b
  last = first + b - 1
  # The queries of a tile keep the keys in (first_q - window, last_q]; a tile is computed when
  # its keys meet that interval.
  visible = first[None, :] <= last[:, None]
  if window is not None:
    visible &= last[None, :] > first[:, None] - window
  return int(visible.sum())


@dataclasses.dataclass(frozen=True)
class SplashAttention:
  """Callable (q [B,T,N,H] pre-scaled, k, v [B,T,K,H], segment_ids [B,T], window) -> [B,T,N,H].

  Attributes:
    softcap: the attention-logit soft-cap (Gemma-2: 50.0), or None.
    mesh, axis_rules: shard the call over the mesh (None: one device).
    block: tile edge (DEFAULT_BLOCK).
  """
  softcap: float | None = None
  mesh: Any = None
  axis_rules: Any = None
  block: int = DEFAULT_BLOCK

  @property
  def interpret(self) -> bool:
    platform = (self.mesh.devices.flat[0].platform if self.mesh is not None
                else jax.default_backend())
    return platform != "tpu"

  def _local(self, q, k, v, segment_ids, window):
    _, seq, heads, _ = q.shape
    kernel = _kernel(seq, heads, window, self.softcap, self.block, self.interpret)
    # The kernel takes one sequence, heads first: [N, T, H].
    qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    seg = segment_ids.astype(jnp.int32)
    out = jax.vmap(kernel)(qt, kt, vt, segment_ids=sk.SegmentIds(q=seg, kv=seg))
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)

  def __call__(self, q, k, v, segment_ids, window: int | None):
    if self.mesh is None or self.axis_rules is None:
      return self._local(q, k, v, segment_ids, window)
    batch_axes, seq_axes, head_axes, kv_axes = (
        nn.logical_to_mesh_axes((name,), self.axis_rules)[0]
        for name in ("batch", "seq", "heads", "kv_heads"))
    if seq_axes is not None:
      raise ValueError(f"splash attention needs an unsharded sequence; the axis rules shard "
                       f"'seq' over {seq_axes}.")
    qkv_spec = P(batch_axes, None, head_axes, None)
    kv_spec = P(batch_axes, None, kv_axes, None)
    fn = jax.shard_map(functools.partial(self._local, window=window), mesh=self.mesh,
                       in_specs=(qkv_spec, kv_spec, kv_spec, P(batch_axes, None)),
                       out_specs=qkv_spec, check_vma=False)
    return fn(q, k, v, segment_ids)


def kernel_costs(*, batch: int, heads: int, seq_len: int, head_dim: int,
                 windows: list[int | None], block: int = DEFAULT_BLOCK) -> dict[str, dict]:
  """Roofline cost of one call of each kernel on one device (XLA counts a custom call as free).

  `batch` and `heads` are per device; `windows` lists every layer's window (None = global), and
  the figure is their mean (the compiled program calls each kernel once per layer and pass).
  Forward: QKᵀ and PV per visible tile (4·b²·H flops); reads q, k and v tiles, writes o and the
  softmax statistics. Fused backward: recomputes QKᵀ, then dP, dV, dK and dQ (10·b²·H); reads q,
  dO and k, v per tile, writes dK, dV and an f32 dQ.
  """
  b = block_size(seq_len, block)
  tiles = float(np.mean([visible_tiles(seq_len, w, block) for w in windows]))
  n = batch * heads
  bf16, f32 = 2, 4
  row = seq_len * head_dim
  fwd = {"flops": n * tiles * 4 * b * b * head_dim,
         "bytes accessed": n * (2 * row * bf16 + tiles * 2 * b * head_dim * bf16 +
                                2 * seq_len * f32)}
  bwd = {"flops": n * tiles * 10 * b * b * head_dim,
         "bytes accessed": n * (tiles * 2 * b * head_dim * bf16 + 2 * row * bf16 +
                                2 * row * bf16 + row * f32 + 2 * seq_len * f32)}
  return {FWD_KERNEL: fwd, BWD_KERNEL: bwd}
