"""Who reaches a good int2 clipping first: a dedicated int2 grid, or the int2 slice of an int8 code.

    python -m matquant_jax.demo --train_only          # once: runs/demo/pretrain
    python benchmarks/int2_clipping_travel.py

OmniQuant's clipping γ = σ(logit) starts at σ(4) = 0.982, and Adam moves a logit by about lr per
step, so a budget of steps × lr bounds how far the clipping can travel. This script isolates
that effect from everything else in block-wise calibration (LET, activations, other widths): it
learns per-row γ, β on the weight reconstruction error ‖W − Q(W)‖² of an int2 model, two ways:

  baseline   MinMax(2) with γ, β: the dedicated int2 grid (parent = 2)
  slice      MinMax(8) with γ, β, sliced to 2 bits (Eq. 6): MatQuant's int2 (as Single Precision)

on the demo's pretrained FFN kernels and on random kernels of the same shapes with Gaussian and
Student-t (ν = 3, heavy-tailed like LLM weight rows) entries, at the paper's budget (lr 1e-3,
1,221 steps for the slice, 2,442 for the baseline: 10M and 20M tokens per block), at that lr with
equal steps (1,221 each), and at a budget long enough for both to converge (lr 1e-2, 3,000 steps
each). Prints one JSON line per kernel set
× budget: each method's error relative to plain MinMax(2) and its median clipping factor.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

# name: (lr, slice steps, baseline steps)
BUDGETS = {"paper": (1e-3, 1221, 2442), "paper, equal steps": (1e-3, 1221, 1221),
           "converged": (1e-2, 3000, 3000)}


def demo_kernels(pretrained: pathlib.Path) -> dict[str, np.ndarray]:
  """The demo model's FFN kernels as [inputs, outputs] matrices (one MinMax row per column)."""
  from matquant_jax.checkpoints import weight_source
  _, params = weight_source.load(f"run:{pretrained}")
  gate_up, down = [], []
  for name, layer in sorted(params.items()):
    mlp = layer.get("mlp", {}) if name.startswith("layer_") else {}
    if "gating_einsum" in mlp:                 # (2, D, F): reduce over D
      gate_up += list(mlp["gating_einsum"]["w"])
    if "linear" in mlp:                        # (F, D): reduce over F
      down.append(mlp["linear"]["w"])
  if not gate_up or not down:
    raise SystemExit(f"{pretrained}/final_params holds no Gemma-2 FFN kernels "
                     f"(mlp/gating_einsum, mlp/linear): pass a demo pretraining run.")
  return {"gate_up": np.concatenate(gate_up, 1), "down": np.concatenate(down, 1)}


def learn(w: np.ndarray, parent_bits: int, lr: float, steps: int) -> tuple[float, float]:
  """(reconstruction MSE of the int2 model, median γ/β) after `steps` of Adam on γ, β's logits."""
  import jax
  import jax.numpy as jnp
  import optax
  from matquant_jax.quant import fake_quant, minmax
  w = jnp.asarray(w)
  logits = {"gamma": jnp.full((1, w.shape[1]), 4.0), "beta": jnp.full((1, w.shape[1]), 4.0)}
  opt = optax.adam(lr)

  def mse(p):
    q = fake_quant.fake_quant(w, 2, parent_bits, 0, gamma=minmax.lwc_factor(p["gamma"]),
                              beta=minmax.lwc_factor(p["beta"]))
    return jnp.mean(jnp.square(q - w))

  def step(carry, _):
    p, s = carry
    g = jax.grad(mse)(p)
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  run = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=steps)[0][0])
  p = run(logits)
  factors = minmax.lwc_factor(jnp.concatenate([p["gamma"], p["beta"]]))
  return float(mse(p)), float(jnp.median(factors))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pretrained", default="runs/demo/pretrain")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  pretrained = pathlib.Path(args.pretrained)
  if not (pretrained / "final_params").is_dir():
    raise SystemExit(f"{pretrained} has no final_params: run `python -m matquant_jax.demo "
                     f"--train_only` first, or pass --pretrained=<a demo pretrain run>.")
  import jax.numpy as jnp
  from matquant_jax.quant import fake_quant
  rng = np.random.default_rng(args.seed)
  sets = {}
  for kind, w in demo_kernels(pretrained).items():
    sets[f"demo {kind}"] = w
    sets[f"gaussian {kind}"] = rng.standard_normal(w.shape).astype(np.float32) * w.std()
    t = rng.standard_t(3, w.shape).astype(np.float32)
    sets[f"student-t3 {kind}"] = t * (w.std() / t.std())
  for name, w in sets.items():
    minmax_mse = float(jnp.mean(jnp.square(fake_quant.fake_quant(jnp.asarray(w), 2, 2, 0) - w)))
    for budget, (lr, slice_steps, baseline_steps) in BUDGETS.items():
      b_mse, b_clip = learn(w, 2, lr, baseline_steps)
      s_mse, s_clip = learn(w, 8, lr, slice_steps)
      print(json.dumps({
          "weights": name, "shape": list(w.shape), "budget": budget, "lr": lr,
          "steps": {"slice": slice_steps, "baseline": baseline_steps},
          "mse_vs_minmax": {"baseline": round(b_mse / minmax_mse, 4),
                            "slice": round(s_mse / minmax_mse, 4)},
          "median_clipping": {"baseline": round(b_clip, 3), "slice": round(s_clip, 3)},
          "winner": "slice" if s_mse < b_mse else "baseline"}), flush=True)


if __name__ == "__main__":
  main()
