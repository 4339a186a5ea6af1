"""Mix'n'Match search: the best per-layer (or per-kernel) widths of one int8 checkpoint under a
memory budget, with no training (spec §5.3; the search itself is ours, after EvoPress/MatGPTQ).

    batches, name = perplexity.packed_sample(tok, "kjv", split="train", seq_len=128,
                                             batch_size=16, max_tokens=8192, vocab_size=V)
    result = search(ckpt, batches, budget=3.0, granularity="layer", widths=(2, 3, 4, 6, 8))
    result.plan        # e.g. ffn:[3,4,3,2]; PrecisionPlan.parse(str(result.plan)) == result.plan

Fitness: KL(parent ‖ plan), the mean over calibration tokens of the KL divergence from the
parent-width model's next-token distribution (the int8 slice of a MatQuant checkpoint) to the
plan's, in nats. The parent model is the natural teacher: it is what every slice is cut from.

Procedure, for units u (layers, or kernels: gating_einsum = gate+up and linear = down for the
FFN, q/kv/attn_vec for attention) and widths w:
  1. Sensitivity: cost[u, w] = KL with unit u alone at width w, every other unit at the parent
     width (one model evaluation each; zero at the parent width). With --granularity=kernel,
     the layer's measured KL is split among its kernels in proportion to their output-error
     proxy Σ E[x_i²]·(W_w − W_parent)²_ij (inputs x from one pass over the calibration text),
     so the count of evaluations does not grow with the number of kernels.
  2. Exact solve: minimise Σ_u cost[u, w_u] subject to Σ_u size_u·w_u <= budget (a knapsack over
     units × widths, `solve_budget`), assuming the costs add up.
  3. Refinement with real evaluations (EvoPress-style, seeded): from the best of the solver's
     plan and the four fixed strategies at the budget, each generation proposes level-switch
     mutations (raise one unit's width, lower others until the budget holds), evaluates the
     few the additive proxy likes best, and keeps the best plan seen. It stops when the
     evaluation budget (`max_evals`, counted with steps 1-2) is spent or nothing improves.
The number of model evaluations is known before the first one (`evaluation_count`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.checkpoints import _common
from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
from matquant_jax.evaluation import perplexity as ppl_lib
from matquant_jax.models import layers
from matquant_jax.models.transformer import Transformer
from matquant_jax.quant import kernels as kernels_lib
from matquant_jax.quant.plan import MIX_N_MATCH, PrecisionPlan, plan_kernels

GRANULARITIES = ("layer", "kernel")
UNITS = ("bits", "bytes")
DEFAULT_WIDTHS = (2, 3, 4, 6, 8)
DEFAULT_MAX_EVALS = 200
PROPOSALS_PER_GENERATION = 48   # mutations drawn per generation (cheap: proxy only)
EVALS_PER_GENERATION = 4        # of which the proxy's best are evaluated
PATIENCE = 6                    # generations without improvement before stopping
STAT_BYTES = 8                  # α and z per output channel, float32 each


@dataclasses.dataclass(frozen=True)
class Unit:
  """What the search assigns one width to: a layer's quantized kernels, or one kernel."""
  layer: int
  names: tuple[str, ...]  # the checkpoint's '/'-joined kernel paths
  size: int               # quantized parameters


def _kernel_name(path: str) -> str:
  return path.split("/")[-2]


def search_units(ckpt: MatQuantCheckpoint, granularity: str) -> list[Unit]:
  """The checkpoint's quantized kernels grouped per layer or one per kernel, in plan order."""
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r}: choose one of {', '.join(GRANULARITIES)}.")
  order = [n for _, n in plan_kernels(ckpt.scope)]
  units = []
  for layer in range(ckpt.config.num_layers):
    names = sorted((p for p in ckpt.qtensors if p.startswith(f"layer_{layer}/")),
                   key=lambda p: order.index(_kernel_name(p)))
    sizes = [ckpt.qtensors[p].size for p in names]
    if granularity == "layer":
      units.append(Unit(layer, tuple(names), int(sum(sizes))))
    else:
      units += [Unit(layer, (p,), int(s)) for p, s in zip(names, sizes)]
  return units


def _seed_names(granularity: str) -> tuple[str, ...]:
  """The plans refinement starts from: the solver's, the layer-level solver's (kernel
  granularity), the widest uniform plan within the budget, and the four fixed strategies."""
  return (("solver",) + (("layer_solver",) if granularity == "kernel" else ()) + ("uniform",) +
          tuple(s.value for s in MIX_N_MATCH))


def evaluation_count(num_layers: int, widths: Sequence[int], parent_bits: int = 8,
                     max_evals: int = DEFAULT_MAX_EVALS, granularity: str = "layer"
                     ) -> dict[str, int]:
  """Model evaluations one search needs at most, known before it starts (step 1 is per layer
  for both granularities)."""
  sensitivity = num_layers * sum(1 for w in widths if w != parent_bits)
  seeds = len(_seed_names(granularity))
  fixed = 1 + sensitivity + seeds  # +1: the parent model's reference distribution
  return {"reference": 1, "sensitivity": sensitivity, "seeds": seeds,
          "refinement": max(0, max_evals - fixed), "total": max(fixed, max_evals)}


# Exact solver ---------------------------------------------------------------------------------


def solve_budget(costs: np.ndarray, sizes: Sequence[int], widths: Sequence[int],
                 capacity_bits: float, *, max_cells: int = 4_000_000) -> tuple[int, ...]:
  """Width index per unit minimising Σ costs[u, j] subject to Σ sizes[u]·widths[j] <= capacity.

  Exact (dynamic programming over used capacity) in units of the sizes' greatest common divisor,
  which for transformer kernels is large (equal layers): the table has U × capacity/gcd cells.
  Should that exceed `max_cells`, weights are coarsened by rounding each unit's bits *up*, which
  never breaks the budget but may miss the optimum by one coarse step.

  Raises ValueError if even the narrowest width does not fit.
  """
  costs = np.asarray(costs, np.float64)
  num_units, num_widths = costs.shape
  sizes = [int(s) for s in sizes]
  if len(sizes) != num_units or len(widths) != num_widths:
    raise ValueError(f"costs {costs.shape} do not match {len(sizes)} sizes × {len(widths)} widths.")
  g = functools.reduce(math.gcd, sizes)
  weights = np.array([[s // g * w for w in widths] for s in sizes], np.int64)
  cap = int(math.floor(capacity_bits / g * (1 + 1e-12)))
  if num_units * (cap + 1) > max_cells:
    q = math.ceil(num_units * (cap + 1) / max_cells)
    weights = -(-weights // q)
    cap //= q
  if weights.min(axis=1).sum() > cap:
    raise ValueError(f"the budget of {capacity_bits:.6g} bits cannot hold every unit even at "
                     f"the narrowest width {min(widths)}.")
  inf = np.inf
  dp = np.full(cap + 1, inf)
  dp[0] = 0.0
  choice = np.zeros((num_units, cap + 1), np.int16)
  for u in range(num_units):
    new = np.full(cap + 1, inf)
    for j in range(num_widths):
      wgt = weights[u, j]
      if wgt > cap:
        continue
      cand = np.full(cap + 1, inf)
      cand[wgt:] = dp[:cap + 1 - wgt] + costs[u, j]
      better = cand < new
      new[better] = cand[better]
      choice[u, better] = j
    dp = new
  # Lowest cost; among equal costs the one that uses the most of the budget.
  best = min(range(cap + 1), key=lambda c: (dp[c], -c))
  out = []
  c = best
  for u in reversed(range(num_units)):
    j = int(choice[u, c])
    out.append(j)
    c -= weights[u, j]
  return tuple(reversed(out))


# Scoring plans on calibration text --------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _programs(forward):
  def logp(params, b):
    logits = forward(params, b["inputs"], b["positions"], b["segment_ids"])
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  def kl(params, ref_logp, b):
    lp = logp(params, b)
    per_token = jnp.sum(jnp.exp(ref_logp) * (ref_logp - lp), axis=-1)
    mask = b["loss_mask"].astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, per_token * mask, 0.0)), jnp.sum(mask)

  def kl_recompute(params, ref_params, b):
    return kl(params, logp(ref_params, b), b)

  return jax.jit(logp), jax.jit(kl), jax.jit(kl_recompute)


class PlanScorer:
  """KL(parent ‖ plan) of plans of one checkpoint on fixed calibration batches.

  Keeps one dequantized tree and re-slices only the kernels whose width changed, so a search
  step costs one forward pass per batch. The parent's log-probabilities are computed once and
  kept when they fit `reference_cache_bytes`, else recomputed beside every evaluation.
  """

  def __init__(self, ckpt: MatQuantCheckpoint, batches: Sequence[dict], *,
               extra_precision: bool = False, dtype: Any = jnp.float32,
               reference_cache_bytes: int = 1 << 30):
    self.ckpt = ckpt
    self.extra_precision = extra_precision
    self.dtype = dtype
    self.batches = [ppl_lib.put_batch(b) for b in batches]
    self.evaluations = 0
    # Arrays go where the batches are (replicated over the data mesh) once, not per step.
    self._flat = {n: ppl_lib.place_params(v.astype(dtype)) for n, v in ckpt.floats.items()}
    self._widths: dict[str, int] = {}
    self._set({n: ckpt.parent_bits for n in ckpt.qtensors})
    self.reference = self.params()
    forward = ppl_lib.model_forward(ckpt.config, PrecisionPlan.bf16(), dtype)
    self._logp, self._kl, self._kl_recompute = _programs(forward)
    b0 = batches[0]["inputs"]
    ref_bytes = len(batches) * b0.size * ckpt.config.vocab_size * 4
    self._ref_logp = ([self._logp(self.reference, b) for b in self.batches]
                      if ref_bytes <= reference_cache_bytes else None)
    self.tokens = float(sum(np.asarray(b["loss_mask"]).sum() for b in batches))

  def _set(self, widths: dict[str, int]) -> None:
    for name, w in widths.items():
      if self._widths.get(name) != w:
        self._flat[name] = ppl_lib.place_params(self.ckpt.kernel_at(
            name, w, extra_precision=self.extra_precision, dtype=self.dtype))
        self._widths[name] = w

  def params(self):
    return _common.unflatten_tree(dict(self._flat))

  def score(self, widths: dict[str, int]) -> float:
    """Mean KL per calibration token (nats) with each named kernel at its width (others at
    the parent width)."""
    full = {n: self.ckpt.parent_bits for n in self.ckpt.qtensors}
    full.update(widths)
    self._set(full)
    params = self.params()
    if self._ref_logp is not None:
      sums = [self._kl(params, r, b) for r, b in zip(self._ref_logp, self.batches)]
    else:
      sums = [self._kl_recompute(params, self.reference, b) for b in self.batches]
    total = np.asarray(jax.device_get(sums), np.float64).reshape(-1, 2).sum(axis=0)
    self.evaluations += 1
    return float(total[0] / max(total[1], 1.0))


def input_second_moments(ckpt: MatQuantCheckpoint, params, batches: Sequence[dict],
                         dtype: Any = jnp.float32) -> dict[str, np.ndarray]:
  """E[x²] over real calibration tokens of every quantized kernel's input, per contracting
  feature (the shape of the kernel's contracting axes), keyed by the kernel's param path."""
  model = Transformer(ckpt.config, plan=PrecisionPlan.bf16(), dtype=dtype)
  wanted = {p.rsplit("/", 1)[0] for p in ckpt.qtensors}

  def run(params, b):
    got = {}
    real = (b["segment_ids"] > 0).astype(jnp.float32)

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, layers.Einsum) and context.method_name == "__call__":
        path = "/".join(context.module.path)
        if path in wanted:
          x = args[1].astype(jnp.float32)
          m = real.reshape(real.shape + (1,) * (x.ndim - 2))
          got[path] = jnp.sum(jnp.square(x) * m, axis=(0, 1))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      model.apply({"params": params}, b["inputs"], positions=b["positions"],
                  segment_ids=b["segment_ids"])
    return got, jnp.sum(real)

  fn = jax.jit(run)
  sums, count = {}, 0.0
  for b in batches:
    got, n = fn(params, b)
    count += float(n)
    for k, v in got.items():
      sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
  return {f"{k}/w": v / max(count, 1.0) for k, v in sums.items()}


def kernel_error_proxy(ckpt: MatQuantCheckpoint, moments: dict[str, np.ndarray],
                       widths: Sequence[int], *, extra_precision: bool = False
                       ) -> dict[str, dict[int, float]]:
  """Σ E[x_i²]·(W_w − W_parent)²_ij per kernel and width: the output error of serving the
  kernel at width w instead of the parent width, for inputs with independent features."""
  out = {}
  for name, qt in ckpt.qtensors.items():
    axes = kernels_lib.lookup(name).reduce_axes
    h = moments[name]
    shape = [1] * qt.codes.ndim
    for a, s in zip(axes, h.shape):
      shape[a] = s
    h = h.reshape(shape)
    ref = np.asarray(ckpt.kernel_at(name, ckpt.parent_bits, dtype=jnp.float32), np.float64)
    out[name] = {}
    for w in widths:
      if w == ckpt.parent_bits:
        out[name][w] = 0.0
        continue
      wq = np.asarray(ckpt.kernel_at(name, w, extra_precision=extra_precision,
                                     dtype=jnp.float32), np.float64)
      out[name][w] = float(np.sum(h * np.square(wq - ref)))
  return out


# The search --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchResult:
  """One budget's searched plan and how it was found."""
  plan: PrecisionPlan
  budget: float
  unit: str
  granularity: str
  effective_bits: float
  kernel_bytes: int
  calibration_kl: float
  solver_kl: float
  fixed_kl: dict[str, float]
  evaluations: int
  seconds: float
  calibration: str = ""

  def to_json(self) -> dict[str, Any]:
    return {"plan": str(self.plan), "budget": self.budget, "unit": self.unit,
            "granularity": self.granularity, "effective_bits": self.effective_bits,
            "kernel_bytes": self.kernel_bytes, "calibration_kl": self.calibration_kl,
            "solver_kl": self.solver_kl, "fixed_strategies_kl": self.fixed_kl,
            "evaluations": self.evaluations, "seconds": round(self.seconds, 2),
            "calibration": self.calibration}


@dataclasses.dataclass
class Sensitivity:
  """Step 1's measurements, shared by every budget of a sweep."""
  units: list[Unit]
  granularity: str
  widths: tuple[int, ...]
  costs: np.ndarray  # [units, widths] predicted KL of each unit alone at each width
  layer_costs: np.ndarray  # [layers, widths] the measured per-layer KL
  evaluations: int


def kernel_bytes(ckpt: MatQuantCheckpoint, widths: dict[str, int]) -> int:
  """Bytes of the quantized kernels served at `widths`: packed r-bit codes plus α and z."""
  codes = sum(-(-qt.size * widths.get(name, ckpt.parent_bits) // 8)
              for name, qt in ckpt.qtensors.items())
  return codes + _stat_bytes(ckpt)


def _stat_bytes(ckpt: MatQuantCheckpoint) -> int:
  return sum(STAT_BYTES * int(np.prod(qt.scale.shape)) for qt in ckpt.qtensors.values())


def capacity_bits(ckpt: MatQuantCheckpoint, budget: float, unit: str) -> float:
  """The budget as a number of code bits over all quantized kernels."""
  if unit not in UNITS:
    raise ValueError(f"unit={unit!r}: choose one of {', '.join(UNITS)}.")
  total = sum(qt.size for qt in ckpt.qtensors.values())
  if unit == "bits":
    return budget * total
  return (budget - _stat_bytes(ckpt)) * 8.0


def check_widths(widths: Sequence[int], parent_bits: int) -> tuple[int, ...]:
  widths = tuple(sorted(set(int(w) for w in widths)))
  if not widths or widths[0] < 1 or widths[-1] > parent_bits:
    raise ValueError(f"widths={list(widths)}: every width must be in 1..{parent_bits} (the "
                     f"checkpoint's parent width).")
  return widths


def measure_sensitivity(ckpt: MatQuantCheckpoint, scorer: PlanScorer, granularity: str,
                        widths: Sequence[int], *, log: Callable[[str], None] = print
                        ) -> Sensitivity:
  """Step 1 (module docstring): cost[u, w] for every unit and width."""
  widths = check_widths(widths, ckpt.parent_bits)
  layer_units = search_units(ckpt, "layer")
  units = search_units(ckpt, granularity)
  before = scorer.evaluations
  t0 = time.time()
  layer_cost = np.zeros((len(layer_units), len(widths)))
  todo = [w for w in widths if w != ckpt.parent_bits]
  n = len(layer_units) * len(todo)
  for i, u in enumerate(layer_units):
    for w in todo:
      layer_cost[i, widths.index(w)] = scorer.score({p: w for p in u.names})
    done = (i + 1) * len(todo)
    log(f"  sensitivity {done}/{n} evaluations  layer {u.layer}: " + "  ".join(
        f"int{w} {layer_cost[i, widths.index(w)]:.4f}" for w in todo) +
        f"  ({time.time() - t0:.1f}s)")
  if granularity == "layer":
    costs = layer_cost
  else:
    moments = input_second_moments(ckpt, scorer.reference, scorer.batches, scorer.dtype)
    proxy = kernel_error_proxy(ckpt, moments, widths, extra_precision=scorer.extra_precision)
    costs = np.zeros((len(units), len(widths)))
    for k, u in enumerate(units):
      layer_names = layer_units[u.layer].names
      for j, w in enumerate(widths):
        denom = sum(proxy[p][w] for p in layer_names)
        share = proxy[u.names[0]][w] / denom if denom > 0 else 1.0 / len(layer_names)
        costs[k, j] = layer_cost[u.layer, j] * share
  return Sensitivity(units, granularity, widths, costs, layer_cost,
                     scorer.evaluations - before)


def _plan_of(ckpt: MatQuantCheckpoint, sens: Sensitivity, levels: Sequence[int],
             extra_precision: bool) -> PrecisionPlan:
  per_kernel = _widths_of(sens, levels)
  order = [n for _, n in plan_kernels(ckpt.scope)]
  entries = []
  for layer in range(ckpt.config.num_layers):
    by_kernel = {_kernel_name(p): w for p, w in per_kernel.items()
                 if p.startswith(f"layer_{layer}/")}
    entries.append(tuple(by_kernel[n] for n in order))
  return PrecisionPlan.explicit(entries, ckpt.scope, extra_precision=extra_precision,
                                parent_bits=ckpt.parent_bits)


def _widths_of(sens: Sensitivity, levels: Sequence[int]) -> dict[str, int]:
  return {p: sens.widths[j] for u, j in zip(sens.units, levels) for p in u.names}


def _levels_of_plan(ckpt, sens: Sensitivity, plan: PrecisionPlan) -> tuple[int, ...] | None:
  """A fixed plan's width index per unit, or None when it uses a width outside the search's."""
  out = []
  for u in sens.units:
    w = {ckpt.slice_bits(plan, p) for p in u.names}
    if len(w) != 1 or next(iter(w)) not in sens.widths:
      return None
    out.append(sens.widths.index(next(iter(w))))
  return tuple(out)


def search(ckpt: MatQuantCheckpoint, scorer: PlanScorer, sens: Sensitivity, budget: float, *,
           unit: str = "bits", max_evals: int = DEFAULT_MAX_EVALS, seed: int = 0,
           log: Callable[[str], None] = print) -> SearchResult:
  """Steps 2 and 3 for one budget, from a shared step 1 (module docstring).

  Long: steps 2 and 3 of the method read top to bottom; its pieces (_proposals,
  _fixed_strategies, solve_budget) are separate.
  """
  t0 = time.time()
  cap = capacity_bits(ckpt, budget, unit)
  sizes = [u.size for u in sens.units]
  weights = np.array([[u.size * w for w in sens.widths] for u in sens.units], np.float64)
  spent = 1 + sens.evaluations  # the parent's reference pass, and step 1

  def fits(levels):
    return weights[np.arange(len(levels)), list(levels)].sum() <= cap * (1 + 1e-12)

  def proxy(levels):
    return float(sens.costs[np.arange(len(levels)), list(levels)].sum())

  start_evals = scorer.evaluations
  seen: dict[tuple[int, ...], float] = {}

  def evaluate(levels):
    if levels not in seen:
      seen[levels] = scorer.score(_widths_of(sens, levels))
    return seen[levels]

  dp = solve_budget(sens.costs, sizes, sens.widths, cap)
  solver_kl = evaluate(dp)
  if sens.granularity == "kernel":
    layer_units = search_units(ckpt, "layer")
    by_layer = solve_budget(sens.layer_costs, [u.size for u in layer_units], sens.widths, cap)
    evaluate(tuple(by_layer[u.layer] for u in sens.units))
  fitting = [j for j in range(len(sens.widths)) if fits((j,) * len(sens.units))]
  if fitting:
    evaluate((max(fitting),) * len(sens.units))
  fixed_kl = {name: evaluate(levels) for name, levels in
              _fixed_strategies(ckpt, sens, budget, scorer.extra_precision, fits).items()
              } if unit == "bits" else {}
  best = min(seen, key=seen.get)
  log(f"  budget {budget:g} {unit}: solver plan KL {solver_kl:.4f}" + "".join(
      f", {k} {v:.4f}" for k, v in fixed_kl.items()))
  remaining = max_evals - spent - (scorer.evaluations - start_evals)
  rng = np.random.default_rng(seed)
  top = len(sens.widths) - 1
  stale = 0
  while remaining > 0 and stale < PATIENCE:
    proposals = _proposals(best, rng, top, fits, seen)
    if not proposals:
      stale += 1
      continue
    chosen = sorted(proposals, key=lambda c: (proxy(c), c))[:min(EVALS_PER_GENERATION, remaining)]
    before = seen[best]
    for c in chosen:
      evaluate(c)
    remaining -= len(chosen)
    best = min(seen, key=seen.get)
    stale = 0 if seen[best] < before - 1e-9 else stale + 1
    log(f"  refine: {len(seen)} plans evaluated, best KL {seen[best]:.4f}")
  plan = _plan_of(ckpt, sens, best, scorer.extra_precision)
  widths = _widths_of(sens, best)
  return SearchResult(
      plan=plan, budget=float(budget), unit=unit, granularity=sens.granularity,
      effective_bits=ckpt.effective_bits(plan), kernel_bytes=kernel_bytes(ckpt, widths),
      calibration_kl=seen[best], solver_kl=solver_kl, fixed_kl=fixed_kl,
      evaluations=spent + scorer.evaluations - start_evals, seconds=time.time() - t0)


def _fixed_strategies(ckpt, sens: Sensitivity, budget: float, extra_precision: bool, fits
                      ) -> dict[str, tuple[int, ...]]:
  """The four fixed Mix'n'Match layouts at this budget, as search levels, where they fit."""
  out = {}
  for strategy in MIX_N_MATCH:
    try:
      plan = PrecisionPlan.mix_n_match(strategy, budget=budget, scope=ckpt.scope,
                                       extra_precision=extra_precision)
    except ValueError:
      continue
    levels = _levels_of_plan(ckpt, sens, plan)
    if levels is not None and fits(levels):
      out[strategy.value] = levels
  return out


def _proposals(best, rng, top: int, fits, seen) -> set[tuple[int, ...]]:
  """One generation of mutations of `best`: raise one unit's width, then lower random others
  until the plan fits the budget (EvoPress-style); only new, fitting plans."""
  num_units = len(best)
  proposals = set()
  for _ in range(PROPOSALS_PER_GENERATION):
    levels = list(best)
    up = int(rng.integers(num_units))
    if levels[up] == top:
      continue
    levels[up] = int(rng.integers(levels[up] + 1, top + 1))
    for v in rng.permutation(num_units):
      if fits(levels):
        break
      if v != up and levels[v] > 0:
        levels[v] = int(rng.integers(0, levels[v]))
    if fits(levels) and tuple(levels) not in seen:
      proposals.add(tuple(levels))
  return proposals


# Running a search from text ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchOptions:
  """What a search measures on (documented defaults; the CLI's flags)."""
  unit: str = "bits"                   # budget in effective bits per parameter, or bytes
  granularity: str = "layer"           # one width per layer, or per kernel
  widths: tuple[int, ...] = DEFAULT_WIDTHS
  extra_precision: bool = False        # search over unclamped (":ep") slices
  source: str = "kjv"                  # calibration text: a source string of data.sources
  split: str = "train"                 # disjoint from the evaluation split ('validation')
  seq_len: int = 128
  batch_size: int = 16
  tokens: int = 8192                   # calibration tokens (the first ones of the split)
  max_evals: int = DEFAULT_MAX_EVALS   # model evaluations per budget, everything included
  seed: int = 0
  tfds_data_dir: str | None = None


def check_disjoint(calibration: tuple[str, str], evaluation: tuple[str, str]) -> None:
  """Refuses to evaluate on the text a plan was searched on: the same source with the same
  split, 'all', or a sub-split of the same base split ('train[:10%]' vs 'train')."""
  (c_src, c_split), (e_src, e_split) = calibration, evaluation
  if c_src != e_src:
    return
  base = lambda s: s.split("[")[0].strip()
  if c_split == e_split or "all" in (c_split, e_split) or base(c_split) == base(e_split):
    raise ValueError(
        f"the search calibrates on {c_src}[{c_split}] and would be evaluated on "
        f"{e_src}[{e_split}]: that is the same text, so its score would be optimistic. Search "
        f"on another split (e.g. --search_split=train) or evaluate on held-out text.")


def run(ckpt: MatQuantCheckpoint, tokenizer, budgets: Sequence[float],
        options: SearchOptions = SearchOptions(), *, log: Callable[[str], None] = print
        ) -> tuple[list[SearchResult], Sensitivity]:
  """Searches one plan per budget on the calibration text (step 1 shared by all budgets)."""
  if options.unit not in UNITS:
    raise ValueError(f"unit={options.unit!r}: choose one of {', '.join(UNITS)}.")
  widths = check_widths(options.widths, ckpt.parent_bits)
  count = evaluation_count(ckpt.config.num_layers, widths, ckpt.parent_bits, options.max_evals,
                           options.granularity)
  log(f"Mix'n'Match search on {ckpt.config.name}: {len(search_units(ckpt, options.granularity))} "
      f"{options.granularity} units x widths {list(widths)}; model evaluations per budget: "
      f"{count['reference']} reference + {count['sensitivity']} sensitivity (shared) + "
      f"{count['seeds']} seeds + up to {count['refinement']} refinement = at most "
      f"{count['total']}")
  for b in budgets:  # a budget the widths cannot meet fails before any evaluation
    cap = capacity_bits(ckpt, float(b), options.unit)
    total = sum(qt.size for qt in ckpt.qtensors.values())
    if cap < widths[0] * total * (1 - 1e-12):
      raise ValueError(f"budget {b} {options.unit} is below the narrowest width int{widths[0]} "
                       f"on every kernel; raise the budget or add a narrower width.")
  batches, name = ppl_lib.packed_sample(
      tokenizer, options.source, split=options.split, seq_len=options.seq_len,
      batch_size=options.batch_size, max_tokens=options.tokens,
      vocab_size=ckpt.config.vocab_size, tfds_data_dir=options.tfds_data_dir)
  scorer = PlanScorer(ckpt, batches, extra_precision=options.extra_precision)
  log(f"  calibration: {name}, {int(scorer.tokens)} tokens")
  sens = measure_sensitivity(ckpt, scorer, options.granularity, widths, log=log)
  results = []
  for b in budgets:
    r = search(ckpt, scorer, sens, float(b), unit=options.unit, max_evals=options.max_evals,
               seed=options.seed, log=log)
    r.calibration = name
    log(f"  budget {b:g} {options.unit}: {r.plan}  ({r.effective_bits:.3f} bits, "
        f"{r.kernel_bytes} bytes, calibration KL {r.calibration_kl:.4f}, {r.evaluations} "
        f"evaluations, {r.seconds:.1f}s)")
    results.append(r)
  return results, sens
