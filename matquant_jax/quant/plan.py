"""Precision plans: which kernels are quantized, and at which bit-width each layer is served.

A `PrecisionPlan` is frozen, hashable static configuration (a `jax.jit` static argument). The
same MatQuant params serve every plan: a plan only picks, per layer and per kernel kind, which
slice S(q, r) of the c-bit parent code is used (spec §2), or that the kernel stays bf16.

Scope (spec §5.5): the paper's default quantizes the FFN only (gate/up/down); attention
(q/k/v/o) is quantized too only in the QAT FFN + Attention experiments. Embeddings, norms and
the LM head are never quantized by a plan.

Mix'n'Match (spec §5.3)
-----------------------
Each layer is served at one of three tier widths (default int2 / int4 / int8), sliced from the
8-bit parent with no extra training. The paper names four layouts (Pyramid: int2 in the first
and last layers, int8 in the middle, int4 in between; Reverse Pyramid; Increasing; Decreasing)
but gives no per-layer assignments, so these are our documented rules.

Tiers. `tiers=(lo, mid, hi)` are the widths of the low, middle and high tier, any strictly
increasing widths in 1..8 (e.g. (3, 4, 6)); the default is the paper's (2, 4, 8).

Counts. A plan fixes the number of layers per tier (n_lo, n_mid, n_hi) either directly
(`counts`, which must sum to the depth L) or from a budget B of effective bits per parameter,
by one of two rules (`rule`):

  three_tier (default)  among all n_lo + n_mid + n_hi = L, take the largest mean
      (lo·n_lo + mid·n_mid + hi·n_hi) / L that is <= B (+1e-9 for float noise): the budget is
      never left unused when a layer could be raised. Several counts can share that mean;
      prefer those with all three tiers present (the paper's shape, where the budget allows
      it), then the middle tier closest to `mid_share`·L (the documented split between
      tiers, default 1/3: equal thirds at the budget where they fit), then the most high-tier
      layers. When no count with that mean has all three tiers (shallow models), the
      min_spread preference below decides. For L = 26 at B = 3.0 this gives (15, 10, 1); at B = 4.5, (10, 8, 8).
  min_spread  the earlier two-tier rule: the same largest mean, then the most middle-tier
      layers (the smallest spread of precisions around the budget), then the most high-tier
      layers. It rarely mixes all three widths: B = 3.0 on 26 layers gives (13, 13, 0), and
      B = 4.0 gives uniform int4.

Placement. Layers are ranked by their distance to the nearer end of the stack, min(i, L−1−i),
ascending, ties to the lower index (so for L = 8: 0, 7, 1, 6, 2, 5, 3, 4).
  PYRAMID          the first n_lo ranked layers get lo, the next n_mid get mid, the rest hi.
  REVERSE_PYRAMID  the first n_hi ranked layers get hi, the next n_mid get mid, the rest lo.
  INCREASING       layers 0..n_lo−1 get lo, the next n_mid get mid, the last n_hi get hi.
  DECREASING       INCREASING reversed.

Examples, L = 8 (the default three-tier rule):

  layer              0  1  2  3  4  5  6  7
  budget 3.0 -> (n2, n4, n8) = (6, 1, 1)
    pyramid          2  2  2  4  8  2  2  2
    reverse_pyramid  8  2  2  2  2  2  2  4
    increasing       2  2  2  2  2  2  4  8
    decreasing       8  4  2  2  2  2  2  2
  counts (2, 4, 2), 4.5 bits
    pyramid          2  4  4  8  8  4  4  2
    reverse_pyramid  8  4  4  2  2  4  4  8
    increasing       2  2  4  4  4  4  8  8
    decreasing       8  8  4  4  4  4  2  2

Per-kernel widths. An explicit plan may give one layer's kernels different widths (what
`python -m matquant_jax.mixnmatch --granularity=kernel` finds): the entry "a/b" lists widths
in the order of `plan_kernels(scope)`, the FFN kernels (gating_einsum: gate and up, stored and
served as one [2, D, F] tensor; linear: down) then the attention kernels (q, kv, attn_vec).

String form
-----------
Plans print as, and parse from, one compact string (case-insensitive; whitespace around
tokens is tolerated; `PrecisionPlan.parse(str(p)) == p` for every valid plan):

  plan     := "bf16" | scope ":" spec (":" option)*
  scope    := "ffn" | "attn" | "ffn+attn"
  spec     := "int" N                              uniform, e.g. ffn:int4
            | strategy "@" BUDGET                  Mix'n'Match by budget, e.g. ffn:pyramid@3.0
            | strategy "(" n2 "," n4 "," n8 ")"    Mix'n'Match by counts, e.g. ffn:pyramid(4,18,4)
            | "[" entry ("," entry)* "]"           explicit per-layer bits, e.g. ffn:[2,4,8,8,4,2]
  entry    := N | N ("/" N)+                       one width, or one per kernel, e.g. [4,2/4,8]
  strategy := "pyramid" | "reverse_pyramid" | "increasing" | "decreasing"
  option   := "ep"                                 Extra Precision (unclamped slices, Eq. 8)
            | "parent=" N                          parent code width c (default 8)
            | "tiers=" lo "/" mid "/" hi            Mix'n'Match tier widths (default 2/4/8)
            | "mid=" F                             three_tier rule's middle-tier share (1/3)
            | "rule=" ("three_tier" | "min_spread")  budget rule (default three_tier)

"bf16" is the only spelling of the unquantized plan ("ffn:bf16" is rejected). The canonical
string lists options in the order above and omits defaults (parent=8, tiers=2/4/8, mid=1/3,
rule=three_tier).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
from typing import Sequence

from matquant_jax.quant import kernels as kernels_lib
from matquant_jax.quant import validation

# The kernel kinds a plan can quantize; everything else in the model always stays bf16.
KINDS = kernels_lib.KINDS

# Mix'n'Match serves these tier widths by default, sliced from an 8-bit parent (spec §5.3).
MIX_BITS = (2, 4, 8)
MIX_PARENT_BITS = 8
MIN_BUDGET = float(MIX_BITS[0])
MAX_BUDGET = float(MIX_BITS[-1])
_BUDGET_TOL = 1e-9

# Budget rules (module docstring) and the three_tier rule's default middle-tier share.
RULES = ("three_tier", "min_spread")
DEFAULT_RULE = "three_tier"
DEFAULT_MID_SHARE = 1.0 / 3.0

# The quantizable kernels of each kind (quant/kernels.py's table), in per-kernel entry order.
KIND_KERNELS = {kind: tuple(k.name for k in kernels_lib.of_kinds([kind])) for kind in KINDS}

# Storage width of an unquantized weight, reported as the "effective bits" of the bf16 plan.
BF16_BITS = 16.0


class Scope(enum.Enum):
  """Which kernels a plan quantizes."""
  NONE = "none"  # bf16 model, nothing quantized
  FFN = "ffn"  # FFN gate/up/down only (the paper's default)
  ATTN = "attn"  # attention q/k/v/o only
  FFN_ATTN = "ffn+attn"  # both


class Strategy(enum.Enum):
  """How per-layer bit-widths are laid out over depth."""
  UNIFORM = "uniform"
  PYRAMID = "pyramid"  # int2 at both ends, int8 in the middle, int4 in between
  REVERSE_PYRAMID = "reverse_pyramid"  # int8 at both ends, int2 in the middle
  INCREASING = "increasing"  # precision rises with depth
  DECREASING = "decreasing"  # precision falls with depth
  EXPLICIT = "explicit"  # a per-layer list


MIX_N_MATCH = (Strategy.PYRAMID, Strategy.REVERSE_PYRAMID, Strategy.INCREASING,
               Strategy.DECREASING)

_SCOPE_KINDS = {
    Scope.NONE: frozenset(),
    Scope.FFN: frozenset({"ffn"}),
    Scope.ATTN: frozenset({"attn"}),
    Scope.FFN_ATTN: frozenset({"ffn", "attn"}),
}


class _Unset:
  """Default of `PrecisionPlan.bits`: 8 for uniform plans, None for every other plan."""

  def __repr__(self) -> str:
    return "<8 if uniform else None>"


_UNSET = _Unset()


def _to_enum(enum_cls, value, name: str):
  """Accepts an enum member, or its value or name as a string (any case)."""
  if isinstance(value, enum_cls):
    return value
  if isinstance(value, str):
    key = value.strip().lower()
    for member in enum_cls:
      if key in (member.value, member.name.lower()):
        return member
  choices = ", ".join(repr(m.value) for m in enum_cls)
  raise ValueError(f"unknown {name} {value!r}: valid choices are {choices}.")


def _check_int(value, name: str) -> int:
  """A plain (non-bool) int, for counts and depths, where check_bits' range does not apply."""
  if isinstance(value, bool) or not hasattr(value, "__index__"):
    raise ValueError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")
  return int(value)


def _check_num_layers(num_layers) -> int:
  num_layers = _check_int(num_layers, "num_layers")
  if num_layers < 1:
    raise ValueError(f"num_layers={num_layers}: a model needs at least one layer.")
  return num_layers


def plan_kernels(scope: "Scope | str") -> tuple[tuple[str, str], ...]:
  """(kind, kernel) pairs a plan of `scope` quantizes, in per-kernel entry order."""
  scope = _to_enum(Scope, scope, "scope")
  return tuple((k, n) for k in KINDS if k in _SCOPE_KINDS[scope] for n in KIND_KERNELS[k])


def budget_counts(budget: float, num_layers: int, *, tiers: Sequence[int] = MIX_BITS,
                  rule: str = DEFAULT_RULE, mid_share: float = DEFAULT_MID_SHARE
                  ) -> tuple[int, int, int]:
  """(n_lo, n_mid, n_hi) for a Mix'n'Match budget at this depth (rules in the module doc)."""
  num_layers = _check_num_layers(num_layers)
  tiers = _check_tiers(tiers)
  rule = _check_rule(rule)
  mid_share = _check_mid_share(mid_share)
  return _budget_counts(float(budget), num_layers, tiers, rule, mid_share)


@functools.lru_cache(maxsize=1024)
def _budget_counts(budget: float, num_layers: int, tiers: tuple[int, int, int] = MIX_BITS,
                   rule: str = DEFAULT_RULE, mid_share: float = DEFAULT_MID_SHARE
                   ) -> tuple[int, int, int]:
  lo, mid, hi = tiers
  # Compare integer bit totals against the budget so equal means compare exactly.
  limit = (budget + _BUDGET_TOL) * num_layers
  target_mid = mid_share * num_layers
  best_key, best = None, None
  for n_hi in range(num_layers + 1):
    for n_mid in range(num_layers - n_hi + 1):
      n_lo = num_layers - n_hi - n_mid
      total = lo * n_lo + mid * n_mid + hi * n_hi
      if total > limit:
        continue
      if rule == "min_spread":
        key = (total, n_mid, n_hi)
      else:
        three = min(n_lo, n_mid, n_hi) > 0
        key = (total, three, -abs(n_mid - target_mid) if three else n_mid, n_hi)
      if best_key is None or key > best_key:
        best_key, best = key, (n_lo, n_mid, n_hi)
  if best is None:
    raise ValueError(
        f"no mix of int{lo}/int{mid}/int{hi} layers fits a budget of {budget} bits for "
        f"{num_layers} layers: the budget must be at least {lo}.")
  return best


def place_layers(strategy: Strategy | str, counts: Sequence[int],
                 tiers: Sequence[int] = MIX_BITS) -> tuple[int, ...]:
  """Per-layer bits for (n_lo, n_mid, n_hi) under a Mix'n'Match strategy (module doc rules)."""
  strategy = _to_enum(Strategy, strategy, "strategy")
  if strategy not in MIX_N_MATCH:
    raise ValueError(f"place_layers needs a Mix'n'Match strategy, got {strategy.value!r}.")
  n2, n4, n8 = (_check_int(c, "counts entry") for c in counts)
  return _place_layers(strategy, n2, n4, n8, _check_tiers(tiers))


@functools.lru_cache(maxsize=1024)
def _place_layers(strategy: Strategy, n2: int, n4: int, n8: int,
                  tiers: tuple[int, int, int] = MIX_BITS) -> tuple[int, ...]:
  lo, mid, hi = tiers
  num_layers = n2 + n4 + n8
  if strategy in (Strategy.INCREASING, Strategy.DECREASING):
    out = (lo,) * n2 + (mid,) * n4 + (hi,) * n8
    return out if strategy is Strategy.INCREASING else out[::-1]
  ranked = sorted(range(num_layers), key=lambda i: (min(i, num_layers - 1 - i), i))
  if strategy is Strategy.PYRAMID:
    ranked_bits = (lo,) * n2 + (mid,) * n4 + (hi,) * n8
  else:
    ranked_bits = (hi,) * n8 + (mid,) * n4 + (lo,) * n2
  out = [0] * num_layers
  for layer, bits in zip(ranked, ranked_bits):
    out[layer] = bits
  return tuple(out)


def _check_tiers(tiers) -> tuple[int, int, int]:
  try:
    tiers = tuple(tiers)
  except TypeError as e:
    raise ValueError(f"tiers must be three widths (lo, mid, hi), got {tiers!r}.") from e
  if len(tiers) != 3:
    raise ValueError(f"tiers={tiers!r} must have three widths: the low, middle and high tier.")
  tiers = tuple(validation.check_bits(t, "tiers entry") for t in tiers)
  if not tiers[0] < tiers[1] < tiers[2]:
    raise ValueError(f"tiers={tiers} must be strictly increasing (low < middle < high), e.g. "
                     f"(2, 4, 8).")
  return tiers


def _check_rule(rule) -> str:
  if rule not in RULES:
    raise ValueError(f"unknown Mix'n'Match rule {rule!r}: valid rules are "
                     f"{', '.join(map(repr, RULES))}.")
  return rule


def _check_mid_share(mid_share) -> float:
  if isinstance(mid_share, bool) or not isinstance(mid_share, (int, float)):
    raise ValueError(f"mid_share must be a number in [0, 1], got {mid_share!r}.")
  mid_share = float(mid_share)
  if not (math.isfinite(mid_share) and 0.0 <= mid_share <= 1.0):
    raise ValueError(f"mid_share={mid_share} is out of range: the middle tier's share of the "
                     f"layers is in [0, 1].")
  return mid_share


def _format_budget(budget: float) -> str:
  # Python's float str is the shortest text that round-trips, e.g. 3.0, 3.25.
  return str(float(budget))


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
  """Which kernels are quantized, and at which bit-width each layer is served.

  Build plans with the constructors (`bf16`, `uniform`, `mix_n_match`, `explicit`, `parse`)
  rather than field by field. Fields that do not belong to the strategy must be None.

  Attributes:
    scope: which kernel kinds are quantized.
    strategy: how per-layer bits are laid out.
    bits: the slice width r of a UNIFORM plan. Defaults to 8 for UNIFORM plans and None for
      every other plan, so `PrecisionPlan(strategy=..., budget=...)` needs no `bits=None`.
    budget: Mix'n'Match target effective bits per quantized parameter, in [lo, hi] of `tiers`.
    counts: Mix'n'Match number of (lo, mid, hi)-tier layers, instead of a budget.
    layers: EXPLICIT bits per layer: an int, or a tuple with one width per kernel of
      `plan_kernels(scope)` (an entry whose widths are all equal is stored as that int).
    extra_precision: serve the unclamped Extra Precision slices (Eq. 8). A no-op on layers
      served at the parent width, which are not sliced.
    parent_bits: the code width c slices are taken from: 8 for MatQuant, r for a baseline
      trained with MinMax(r). Mix'n'Match tiers must fit in it.
    tiers: Mix'n'Match tier widths (lo, mid, hi); None (the default) for other strategies,
      (2, 4, 8) for Mix'n'Match plans.
    rule: Mix'n'Match budget rule, "three_tier" or "min_spread" (None for other plans).
    mid_share: the three_tier rule's target share of middle-tier layers (None otherwise).
  """
  scope: Scope = Scope.FFN
  strategy: Strategy = Strategy.UNIFORM
  bits: int | None = _UNSET  # type: ignore[assignment]
  budget: float | None = None
  counts: tuple[int, int, int] | None = None
  layers: tuple[int, ...] | None = None
  extra_precision: bool = False
  parent_bits: int = 8
  tiers: tuple[int, int, int] | None = None
  rule: str | None = None
  mid_share: float | None = None

  def __post_init__(self):
    # Frozen: normalized values go in through object.__setattr__; fields end up as enums,
    # ints, floats and tuples so the plan hashes and compares by value.
    def put(name, value):
      object.__setattr__(self, name, value)

    scope = _to_enum(Scope, self.scope, "scope")
    strategy = _to_enum(Strategy, self.strategy, "strategy")
    put("scope", scope)
    put("strategy", strategy)
    if self.bits is _UNSET:
      put("bits", 8 if strategy is Strategy.UNIFORM and scope is not Scope.NONE else None)
    put("parent_bits", validation.check_bits(self.parent_bits, "parent_bits"))
    if not isinstance(self.extra_precision, bool):
      raise ValueError(
          f"extra_precision must be a bool, got {self.extra_precision!r} of type "
          f"{type(self.extra_precision).__name__}.")

    if scope is Scope.NONE or strategy not in MIX_N_MATCH:
      self._reject_fields(("tiers", "rule", "mid_share"), f"strategy {strategy.value!r}",
                          "tiers, rule and mid_share belong to Mix'n'Match layouts.")
    if scope is Scope.NONE:
      self._check_bf16()
    elif strategy is Strategy.UNIFORM:
      self._check_uniform()
    elif strategy is Strategy.EXPLICIT:
      self._check_explicit()
    else:
      self._check_mix_n_match()

  def _reject_fields(self, names: Sequence[str], what: str, hint: str) -> None:
    for name in names:
      value = getattr(self, name)
      if value is not None:
        raise ValueError(f"{name}={value!r} does not apply to {what}: {hint}")

  def _check_bf16(self) -> None:
    hint = "a bf16 plan quantizes nothing; use PrecisionPlan.bf16()."
    if self.strategy is not Strategy.UNIFORM:
      raise ValueError(f"strategy={self.strategy.value!r} does not apply to scope 'none': {hint}")
    self._reject_fields(("bits", "budget", "counts", "layers"), "scope 'none'", hint)
    if self.extra_precision:
      raise ValueError(f"extra_precision=True does not apply to scope 'none': {hint}")
    if self.parent_bits != validation.MAX_PARENT_BITS:
      raise ValueError(f"parent_bits={self.parent_bits} does not apply to scope 'none': {hint}")

  def _check_uniform(self) -> None:
    hint = ("a uniform plan has one bit-width; use PrecisionPlan.mix_n_match or "
            "PrecisionPlan.explicit for per-layer bits.")
    self._reject_fields(("budget", "counts", "layers"), "a uniform plan", hint)
    if self.bits is None:
      raise ValueError(
          f"a uniform {self.scope.value} plan needs bits (1..{self.parent_bits}); for an "
          f"unquantized model use PrecisionPlan.bf16().")
    bits = validation.check_bits(self.bits, "bits")
    validation.check_slice_bits(bits, self.parent_bits)
    object.__setattr__(self, "bits", bits)

  def _check_explicit(self) -> None:
    hint = "an explicit plan takes its bits from `layers`, one entry per layer."
    self._reject_fields(("bits", "budget", "counts"), "an explicit plan", hint)
    if self.layers is None or isinstance(self.layers, (str, bytes)):
      raise ValueError(f"an explicit plan needs layers, a sequence of bits per layer; got "
                       f"{self.layers!r}.")
    try:
      layers = tuple(self.layers)
    except TypeError as e:
      raise ValueError(f"layers must be a sequence of ints, got {self.layers!r}.") from e
    if not layers:
      raise ValueError("layers=() is empty: an explicit plan needs one bit-width per layer.")
    kernels = plan_kernels(self.scope)
    checked = []
    for i, entry in enumerate(layers):
      widths = entry if isinstance(entry, (tuple, list)) else (entry,)
      if len(widths) not in (1, len(kernels)):
        raise ValueError(
            f"layers[{i}]={entry!r} gives {len(widths)} widths, but scope "
            f"{self.scope.value!r} has {len(kernels)} kernels per layer "
            f"({', '.join(n for _, n in kernels)}): give one width, or one per kernel.")
      widths = tuple(validation.check_bits(b, f"layers[{i}]") for b in widths)
      for b in widths:
        if b > self.parent_bits:
          raise ValueError(
              f"layers[{i}]={b} exceeds parent_bits={self.parent_bits}: a slice cannot be wider "
              f"than the code it is cut from; lower it or raise parent_bits.")
      checked.append(widths[0] if len(set(widths)) == 1 else widths)
    object.__setattr__(self, "layers", tuple(checked))

  def _check_mix_n_match(self) -> None:
    name = self.strategy.value
    hint = "Mix'n'Match layouts take a budget or counts (see PrecisionPlan.mix_n_match)."
    self._reject_fields(("bits", "layers"), f"strategy {name!r}", hint)
    tiers = _check_tiers(MIX_BITS if self.tiers is None else self.tiers)
    object.__setattr__(self, "tiers", tiers)
    if tiers[-1] > self.parent_bits:
      raise ValueError(
          f"parent_bits={self.parent_bits} does not work with strategy {name!r} and tiers "
          f"{'/'.join(map(str, tiers))}: Mix'n'Match slices its tiers from the parent code, "
          f"so it must be at least {tiers[-1]} bits; use parent_bits={MIX_PARENT_BITS}.")
    if (self.budget is None) == (self.counts is None):
      given = "both" if self.budget is not None else "neither"
      raise ValueError(
          f"strategy {name!r} needs exactly one of budget (target effective bits, e.g. 3.0) "
          f"or counts (number of int2/int4/int8 layers, e.g. (4, 18, 4)); got {given}.")
    if self.budget is not None:
      budget = self.budget
      if isinstance(budget, bool) or not isinstance(budget, (int, float)) and not hasattr(
          budget, "__float__"):
        raise ValueError(f"budget must be a number, got {budget!r}.")
      budget = float(budget)
      if not (math.isfinite(budget) and tiers[0] <= budget <= tiers[-1]):
        raise ValueError(
            f"budget={budget} is out of range: Mix'n'Match mixes int{tiers[0]}/int{tiers[1]}/"
            f"int{tiers[2]} layers, so the budget must be in [{float(tiers[0])}, "
            f"{float(tiers[-1])}] bits.")
      object.__setattr__(self, "budget", budget)
      object.__setattr__(self, "rule", _check_rule(DEFAULT_RULE if self.rule is None
                                                   else self.rule))
      object.__setattr__(self, "mid_share", _check_mid_share(
          DEFAULT_MID_SHARE if self.mid_share is None else self.mid_share))
    else:
      try:
        counts = tuple(self.counts)
      except TypeError as e:
        raise ValueError(f"counts must be (n2, n4, n8), got {self.counts!r}.") from e
      if len(counts) != 3:
        raise ValueError(
            f"counts={self.counts!r} must have three entries: the number of int2, int4 and "
            f"int8 layers.")
      counts = tuple(_check_int(c, "counts entry") for c in counts)
      if any(c < 0 for c in counts):
        raise ValueError(f"counts={counts} has a negative entry: layer counts must be >= 0.")
      if sum(counts) == 0:
        raise ValueError(f"counts={counts} sum to 0: a model needs at least one layer.")
      object.__setattr__(self, "counts", counts)
      self._reject_fields(("rule", "mid_share"), "counts",
                          "rule and mid_share choose counts from a budget.")

  # Constructors.

  @classmethod
  def bf16(cls) -> PrecisionPlan:
    """The unquantized model: every kernel stays bf16."""
    return cls(scope=Scope.NONE, strategy=Strategy.UNIFORM, bits=None)

  @classmethod
  def uniform(cls, bits: int, scope: Scope | str = Scope.FFN, *, extra_precision: bool = False,
              parent_bits: int = 8) -> PrecisionPlan:
    """Every layer's `scope` kernels served at `bits` (sliced from a `parent_bits` code)."""
    return cls(scope=scope, strategy=Strategy.UNIFORM, bits=bits,
               extra_precision=extra_precision, parent_bits=parent_bits)

  @classmethod
  def mix_n_match(cls, strategy: Strategy | str, *, budget: float | None = None,
                  counts: Sequence[int] | None = None, scope: Scope | str = Scope.FFN,
                  extra_precision: bool = False, tiers: Sequence[int] | None = None,
                  rule: str | None = None, mid_share: float | None = None) -> PrecisionPlan:
    """A Mix'n'Match layout of lo/mid/hi-tier layers (default int2/int4/int8), by budget or
    by counts; `rule` and `mid_share` choose the counts from a budget (module docstring)."""
    strategy = _to_enum(Strategy, strategy, "strategy")
    if strategy not in MIX_N_MATCH:
      choices = ", ".join(repr(s.value) for s in MIX_N_MATCH)
      raise ValueError(
          f"strategy {strategy.value!r} is not a Mix'n'Match layout: valid choices are "
          f"{choices}. Use PrecisionPlan.uniform or PrecisionPlan.explicit instead.")
    return cls(scope=scope, strategy=strategy, bits=None, budget=budget,
               counts=None if counts is None else tuple(counts),
               extra_precision=extra_precision,
               tiers=None if tiers is None else tuple(tiers), rule=rule, mid_share=mid_share)

  @classmethod
  def explicit(cls, layer_bits: Sequence[int | Sequence[int]], scope: Scope | str = Scope.FFN,
               *, extra_precision: bool = False, parent_bits: int = 8) -> PrecisionPlan:
    """Layer i's `scope` kernels served at `layer_bits[i]`: one width, or a tuple with one
    width per kernel of `plan_kernels(scope)`."""
    if isinstance(layer_bits, (str, bytes)):
      raise ValueError(f"layer_bits must be a sequence of ints, got {layer_bits!r}.")
    return cls(scope=scope, strategy=Strategy.EXPLICIT, bits=None,
               layers=tuple(tuple(b) if isinstance(b, (list, tuple)) else b
                            for b in layer_bits),
               extra_precision=extra_precision, parent_bits=parent_bits)

  @classmethod
  def parse(cls, text: str) -> PrecisionPlan:
    """Parses the string form (grammar in the module docstring)."""
    if not isinstance(text, str):
      raise ValueError(f"a plan string must be a str, got {text!r}.")
    try:
      return _parse(text)
    except ValueError as e:
      raise ValueError(f"cannot parse precision plan {text!r}: {e}") from None

  # Queries.

  @property
  def is_quantized(self) -> bool:
    """False for the bf16 plan, True when any kernel is quantized."""
    return self.scope is not Scope.NONE

  def quantizes(self, kind: str) -> bool:
    """Whether kernels of `kind` ("ffn" or "attn") are quantized under this plan."""
    if kind not in KINDS:
      raise ValueError(f"unknown kernel kind {kind!r}: valid kinds are {', '.join(KINDS)}.")
    return kind in _SCOPE_KINDS[self.scope]

  def counts_for(self, num_layers: int) -> tuple[int, int, int]:
    """(n2, n4, n8) of a Mix'n'Match plan at this depth."""
    num_layers = _check_num_layers(num_layers)
    if self.strategy not in MIX_N_MATCH or not self.is_quantized:
      raise ValueError(f"counts_for needs a Mix'n'Match plan, got {self}.")
    if self.counts is not None:
      if sum(self.counts) != num_layers:
        raise ValueError(
            f"counts={self.counts} sum to {sum(self.counts)} layers, but the model has "
            f"{num_layers} layers: the int2/int4/int8 counts must add up to the depth.")
      return self.counts
    return _budget_counts(self.budget, num_layers, self.tiers, self.rule, self.mid_share)

  def layer_bits(self, num_layers: int) -> tuple[int | tuple[int, ...], ...]:
    """Bits per layer for the quantized kernel kinds, resolved for a model of this depth.

    An entry is a tuple (one width per kernel of `plan_kernels(scope)`) only for explicit
    per-kernel plans.

    Raises ValueError for the bf16 plan (nothing is quantized: use `bits_for`, which returns
    None), for an EXPLICIT plan whose length is not `num_layers`, and for counts that do not
    add up to `num_layers`.
    """
    num_layers = _check_num_layers(num_layers)
    if not self.is_quantized:
      raise ValueError("the bf16 plan has no quantized layers; bits_for() returns None for it.")
    if self.strategy is Strategy.UNIFORM:
      return (self.bits,) * num_layers
    if self.strategy is Strategy.EXPLICIT:
      if len(self.layers) != num_layers:
        raise ValueError(
            f"explicit plan {self} lists {len(self.layers)} layers, but the model has "
            f"{num_layers}: give one bit-width per layer.")
      return self.layers
    return _place_layers(self.strategy, *self.counts_for(num_layers), self.tiers)

  def bits_for(self, layer: int, num_layers: int, kind: str,
               kernel: str | None = None) -> int | None:
    """Bit-width of layer `layer`'s `kind` kernels (or of its one `kernel`), or None when
    they stay bf16. Without `kernel`, a layer whose kernels differ is an error."""
    num_layers = _check_num_layers(num_layers)
    if not self.quantizes(kind):
      return None
    layer = _check_int(layer, "layer")
    if not 0 <= layer < num_layers:
      raise ValueError(f"layer={layer} is out of range for a model with {num_layers} layers.")
    entry = self.layer_bits(num_layers)[layer]
    if not isinstance(entry, tuple):
      return entry
    widths = {n: b for (k, n), b in zip(plan_kernels(self.scope), entry) if k == kind}
    if kernel is None:
      if len(set(widths.values())) > 1:
        raise ValueError(f"plan {self} serves layer {layer}'s {kind} kernels at different "
                         f"widths {widths}; ask for one kernel.")
      return next(iter(widths.values()))
    if kernel not in widths:
      raise ValueError(f"unknown {kind} kernel {kernel!r}: valid kernels are "
                       f"{', '.join(widths)}.")
    return widths[kernel]

  def effective_bits(self, num_layers: int,
                     params_per_layer: Sequence[int] | None = None) -> float:
    """Nominal effective bits per quantized parameter: the weighted mean of `layer_bits`.

    Args:
      num_layers: the model depth.
      params_per_layer: the number of quantized parameters in each layer (the weights); equal
        weights when None. With equal-size layers this is the paper's x-axis for Mix'n'Match.

    Returns:
      The mean bit-width. Extra Precision adds a data-dependent cost (a weight in the extra
      bucket needs one more bit) that a plan cannot know; this value counts only the nominal
      r bits. Measure the real cost from the codes with
      `slicing.extra_precision_effective_bits`. The bf16 plan returns 16.0, the storage width of
      its unquantized weights, so it can sit on the same axis.
    """
    num_layers = _check_num_layers(num_layers)
    if params_per_layer is not None:
      weights = [float(w) for w in params_per_layer]
      if len(weights) != num_layers:
        raise ValueError(f"params_per_layer has {len(weights)} entries for {num_layers} layers.")
      if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"params_per_layer={list(params_per_layer)} must be non-negative with a positive "
            f"sum.")
    else:
      weights = [1.0] * num_layers
    if not self.is_quantized:
      return BF16_BITS
    # A per-kernel entry counts as the mean of its kernels' widths (kernels of one layer are
    # weighted equally here; MatQuantCheckpoint.effective_bits weighs them by size).
    bits = [sum(b) / len(b) if isinstance(b, tuple) else b for b in self.layer_bits(num_layers)]
    return sum(w * b for w, b in zip(weights, bits)) / sum(weights)

  def __str__(self) -> str:
    if not self.is_quantized:
      return "bf16"
    if self.strategy is Strategy.UNIFORM:
      spec = f"int{self.bits}"
    elif self.strategy is Strategy.EXPLICIT:
      spec = "[" + ",".join("/".join(map(str, b)) if isinstance(b, tuple) else str(b)
                            for b in self.layers) + "]"
    elif self.budget is not None:
      spec = f"{self.strategy.value}@{_format_budget(self.budget)}"
    else:
      spec = f"{self.strategy.value}({','.join(str(c) for c in self.counts)})"
    parts = [self.scope.value, spec]
    if self.extra_precision:
      parts.append("ep")
    if self.parent_bits != validation.MAX_PARENT_BITS:
      parts.append(f"parent={self.parent_bits}")
    if self.tiers is not None and self.tiers != MIX_BITS:
      parts.append("tiers=" + "/".join(map(str, self.tiers)))
    if self.mid_share is not None and self.mid_share != DEFAULT_MID_SHARE:
      parts.append(f"mid={self.mid_share!r}")
    if self.rule is not None and self.rule != DEFAULT_RULE:
      parts.append(f"rule={self.rule}")
    return ":".join(parts)


# Parsing. Each helper raises ValueError naming the piece it could not read; `parse` adds the
# whole string.

_SCOPES_BY_TEXT = {s.value: s for s in Scope if s is not Scope.NONE}
_STRATEGIES_BY_TEXT = {s.value: s for s in MIX_N_MATCH}
_INT = re.compile(r"\d+")
_FLOAT = re.compile(r"(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?")
_UNIFORM_SPEC = re.compile(r"int\s*([-+.\d]*)")
_MIX_SPEC = re.compile(r"([a-z_]+)\s*(.*)", re.DOTALL)
_COUNTS = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)")
_PARENT = re.compile(r"parent\s*=\s*(.*)", re.DOTALL)
_SPEC_FORMS = "intN, strategy@BUDGET, strategy(n2,n4,n8) or [b0,b1,...]"
_OPTIONS = "'ep', 'parent=N', 'tiers=lo/mid/hi', 'mid=F' and 'rule=three_tier|min_spread'"


def _describe(token: str) -> str:
  return repr(token) if token else "nothing"


def _parse(text: str) -> PrecisionPlan:
  pieces = [p.strip() for p in text.split(":")]
  if pieces[0].lower() == "bf16":
    if len(pieces) > 1:
      raise ValueError(f"'bf16' takes no spec or options, got {':'.join(pieces[1:])!r}.")
    return PrecisionPlan.bf16()
  if not pieces[0]:
    raise ValueError("empty scope: expected 'bf16' or <scope>:<spec>, e.g. 'ffn:int4'.")
  scope = _parse_scope(pieces[0])
  if len(pieces) == 1:
    raise ValueError(
        f"{pieces[0]!r} has no spec: expected {pieces[0]}:<spec>, e.g. {pieces[0]}:int4 "
        f"(spec is one of {_SPEC_FORMS}).")
  fields = _parse_spec(pieces[1])
  fields.update(_parse_options(pieces[2:]))
  return PrecisionPlan(scope=scope, **fields)


def _parse_scope(piece: str) -> Scope:
  # Whitespace may sit around the "+" of "ffn + attn" too.
  scope = _SCOPES_BY_TEXT.get(re.sub(r"\s+", "", piece.lower()))
  if scope is None:
    choices = ", ".join(repr(s) for s in _SCOPES_BY_TEXT)
    raise ValueError(
        f"unknown scope {piece!r}: valid scopes are {choices} (or the whole plan 'bf16').")
  return scope


def _parse_spec(piece: str) -> dict:
  spec = piece.lower()
  if not spec:
    raise ValueError(f"empty spec after the scope: expected one of {_SPEC_FORMS}.")
  if spec == "bf16":
    raise ValueError("'bf16' is a whole plan, not a spec: write 'bf16' (no scope) for the "
                     "unquantized model.")
  if spec.startswith("["):
    return {"strategy": Strategy.EXPLICIT, "bits": None, "layers": _parse_layer_list(piece)}
  m = _UNIFORM_SPEC.fullmatch(spec)
  if m:
    width = m.group(1).strip()
    if not _INT.fullmatch(width):
      raise ValueError(
          f"{piece!r} needs a bit-width after 'int', e.g. 'int4'; got {_describe(width)}.")
    return {"strategy": Strategy.UNIFORM, "bits": int(width)}
  m = _MIX_SPEC.fullmatch(spec)
  name = m.group(1) if m else spec
  strategy = _STRATEGIES_BY_TEXT.get(name)
  if strategy is None:
    choices = ", ".join(repr(s) for s in _STRATEGIES_BY_TEXT)
    raise ValueError(
        f"unknown strategy {name!r} in {piece!r}: valid strategies are {choices}; a spec is "
        f"one of {_SPEC_FORMS}.")
  rest = m.group(2).strip()
  if rest.startswith("@"):
    budget = rest[1:].strip()
    if not _FLOAT.fullmatch(budget):
      raise ValueError(
          f"{piece!r} needs a number after '@', e.g. '{name}@3.0'; got {_describe(budget)}.")
    return {"strategy": strategy, "bits": None, "budget": float(budget)}
  if rest.startswith("("):
    counts = _COUNTS.fullmatch(rest)
    if not counts:
      raise ValueError(
          f"{piece!r} needs three non-negative layer counts (n2,n4,n8), e.g. "
          f"'{name}(4,18,4)'; got {rest!r}.")
    return {"strategy": strategy, "bits": None, "counts": tuple(int(c) for c in counts.groups())}
  raise ValueError(
      f"{piece!r} needs a budget or counts after the strategy, e.g. '{name}@3.0' or "
      f"'{name}(4,18,4)'.")


def _parse_layer_list(piece: str) -> tuple[int, ...]:
  if not piece.endswith("]"):
    raise ValueError(f"{piece!r} opens '[' but does not end with ']', e.g. '[2,4,8,4]'.")
  inner = piece[1:-1].strip()
  if not inner:
    raise ValueError(f"{piece!r} is empty: an explicit plan needs one bit-width per layer.")
  layers = []
  for i, entry in enumerate(e.strip() for e in inner.split(",")):
    if not entry:
      raise ValueError(f"{piece!r} has an empty entry at position {i}, e.g. '[2,4,8,4]'.")
    widths = [w.strip() for w in entry.split("/")]
    if not all(_INT.fullmatch(w) for w in widths):
      raise ValueError(f"{piece!r} has entry {entry!r}, which is not a bit-width (an int) or "
                       f"one width per kernel (e.g. '4/2').")
    layers.append(int(widths[0]) if len(widths) == 1 else tuple(int(w) for w in widths))
  return tuple(layers)


def _parse_options(pieces: Sequence[str]) -> dict:
  fields = {}
  for piece in pieces:
    option = piece.lower()
    parent = _PARENT.fullmatch(option)
    if option == "ep":
      key, value = "extra_precision", True
    elif parent:
      width = parent.group(1).strip()
      if not _INT.fullmatch(width):
        raise ValueError(f"option {piece!r} needs an int, e.g. 'parent=4'.")
      key, value = "parent_bits", int(width)
    elif option.startswith("tiers="):
      widths = [w.strip() for w in option[len("tiers="):].split("/")]
      if len(widths) != 3 or not all(_INT.fullmatch(w) for w in widths):
        raise ValueError(f"option {piece!r} needs three widths, e.g. 'tiers=2/4/8'.")
      key, value = "tiers", tuple(int(w) for w in widths)
    elif option.startswith("mid="):
      share = option[len("mid="):].strip()
      if not _FLOAT.fullmatch(share):
        raise ValueError(f"option {piece!r} needs a number in [0, 1], e.g. 'mid=0.5'.")
      key, value = "mid_share", float(share)
    elif option.startswith("rule="):
      key, value = "rule", option[len("rule="):].strip()
    elif not option:
      raise ValueError(f"empty option (a stray ':'): valid options are {_OPTIONS}.")
    else:
      raise ValueError(f"unknown option {piece!r}: valid options are {_OPTIONS}.")
    if key in fields:
      raise ValueError(f"option {piece!r} is given twice.")
    fields[key] = value
  return fields
