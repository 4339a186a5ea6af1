"""AdamW with linear warmup and cosine decay (spec §6: warmup to 1e-5 over 150 steps, then
cosine). The paper states neither the optimizer nor weight decay nor the final learning rate;
our defaults (AdamW, weight decay 0, decay to 0) are options in the experiment config."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(peak_lr: float, warmup_steps: int, total_steps: int,
                           final_lr_fraction: float = 0.0) -> optax.Schedule:
  """0 → peak over `warmup_steps`, then cosine to peak·final_lr_fraction at `total_steps`."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}.")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
  warmup_steps = min(warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=peak_lr * final_lr_fraction)


def make_optimizer(*, peak_lr: float, warmup_steps: int, total_steps: int,
                   final_lr_fraction: float = 0.0, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, grad_clip_norm: float | None = None,
                   trainable_mask=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and its schedule.

  Args:
    trainable_mask: optional pytree of bools (same structure as params); False leaves are
      frozen (their updates are zero and they get no optimizer state).
  """
  schedule = learning_rate_schedule(peak_lr, warmup_steps, total_steps, final_lr_fraction)
  parts = []
  if grad_clip_norm:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  tx = optax.chain(*parts)
  if trainable_mask is not None:
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable_mask)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx, schedule
