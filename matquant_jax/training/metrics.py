"""Training observability: FLOPs/MFU accounting, console progress, TensorBoard and JSONL logs."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Mapping

import jax

from matquant_jax.models.config import TransformerConfig
from matquant_jax.training import tensorboard

# Dense bf16 peak FLOP/s per device, by `device_kind` substring (first match wins).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v6", 918e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for key, flops in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return flops
  return None


def train_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per token of one pass (PaLM's 6N + 12·L·(N·H)·T accounting).

  N counts every matmul weight the token touches (layers and the output projection, not the
  embedding lookup); local layers attend over min(T, W) keys.
  """
  c = config
  per_layer = (c.embed_dim * c.num_heads * c.head_dim * 2            # q and attn_vec
               + 2 * c.embed_dim * c.num_kv_heads * c.head_dim        # k, v
               + 3 * c.embed_dim * c.hidden_dim)                      # gate, up, down
  n = c.num_layers * per_layer + c.embed_dim * c.vocab_size
  attn = 0
  for i in range(c.num_layers):
    t = min(seq_len, c.sliding_window) if c.is_local(i) and c.sliding_window else seq_len
    attn += 12 * c.num_heads * c.head_dim * t
  return 6.0 * n + attn


class MetricsLogger:
  """Console lines with ETA, TensorBoard scalars and a metrics.jsonl file (process 0 only)."""

  def __init__(self, workdir: str | pathlib.Path, total_steps: int, *, enabled: bool = True,
               prefix: str = ""):
    self.enabled = enabled and jax.process_index() == 0
    self.prefix = f"[{prefix}] " if prefix else ""
    self.total_steps = total_steps
    self.start = time.time()
    self.start_step = None
    self.writer = None
    self.jsonl = None
    if self.enabled:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self.writer = tensorboard.ScalarWriter(workdir / "tensorboard")
      self.jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")

  def log(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    now = time.time()
    if self.start_step is None:
      self.start_step, self.start = step, now
    self.writer.add_scalars({f"train/{k}": v for k, v in metrics.items()}, step)
    self.writer.flush()
    self.jsonl.write(json.dumps({"step": step, "time": now, **metrics}) + "\n")
    self.jsonl.flush()
    done = step - self.start_step
    eta = (now - self.start) / done * (self.total_steps - step) if done > 0 else float("nan")
    parts = [f"step {step}/{self.total_steps}", f"loss {metrics['loss']:.4f}"]
    per_bit = [f"{k[3:]} {v:.3f}" for k, v in sorted(metrics.items()) if k.startswith("ce_")]
    if per_bit:
      parts.append(" ".join(per_bit))
    for key, fmt in (("tokens_per_s", "{:,.0f} tok/s"), ("learning_rate", "lr {:.2e}"),
                     ("grad_norm", "gnorm {:.3f}"), ("mfu", "MFU {:.1%}")):
      if key in metrics:
        parts.append(fmt.format(metrics[key]))
    if eta == eta:
      parts.append(f"ETA {_hms(eta)}")
    print(self.prefix + " | ".join(parts), flush=True)

  def text(self, line: str) -> None:
    if self.enabled:
      print(self.prefix + line, flush=True)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
    if self.jsonl is not None:
      self.jsonl.close()


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")

