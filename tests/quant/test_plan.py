"""Tests for precision plans: validation, Mix'n'Match resolution and the string form."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest

from matquant_jax.quant import plan as plan_lib
from matquant_jax.quant.plan import PrecisionPlan, Scope, Strategy

MIX = ("pyramid", "reverse_pyramid", "increasing", "decreasing")

# Hand-derived from the placement rules; ranked order for L = 8 is 0, 7, 1, 6, 2, 5, 3, 4.
L8_BUDGET_3 = {  # budget 3.0 -> (4, 4, 0)
    "pyramid": (2, 2, 4, 4, 4, 4, 2, 2),
    "reverse_pyramid": (4, 4, 2, 2, 2, 2, 4, 4),
    "increasing": (2, 2, 2, 2, 4, 4, 4, 4),
    "decreasing": (4, 4, 4, 4, 2, 2, 2, 2),
}
L8_BUDGET_5 = {  # budget 5.0 -> (0, 6, 2)
    "pyramid": (4, 4, 4, 8, 8, 4, 4, 4),
    "reverse_pyramid": (8, 4, 4, 4, 4, 4, 4, 8),
    "increasing": (4, 4, 4, 4, 4, 4, 8, 8),
    "decreasing": (8, 8, 4, 4, 4, 4, 4, 4),
}
L8_COUNTS_242 = {
    "pyramid": (2, 4, 4, 8, 8, 4, 4, 2),
    "reverse_pyramid": (8, 4, 4, 2, 2, 4, 4, 8),
    "increasing": (2, 2, 4, 4, 4, 4, 8, 8),
    "decreasing": (8, 8, 4, 4, 4, 4, 2, 2),
}
L8_COUNTS_035 = {  # no int2 layers: pyramid puts int4 at the ends
    "pyramid": (4, 4, 8, 8, 8, 8, 8, 4),
    "reverse_pyramid": (8, 8, 8, 4, 4, 4, 8, 8),
    "increasing": (4, 4, 4, 8, 8, 8, 8, 8),
    "decreasing": (8, 8, 8, 8, 8, 4, 4, 4),
}

PLANS = [
    PrecisionPlan.bf16(),
    PrecisionPlan(),
    *(PrecisionPlan.uniform(b, s) for b in range(1, 9) for s in ("ffn", "attn", "ffn+attn")),
    PrecisionPlan.uniform(2, "ffn+attn", extra_precision=True),
    PrecisionPlan.uniform(8, extra_precision=True),
    PrecisionPlan.uniform(4, parent_bits=4),
    PrecisionPlan.uniform(2, "attn", extra_precision=True, parent_bits=6),
    *(PrecisionPlan.mix_n_match(s, budget=b) for s in MIX for b in (2, 2.5, 3.0, 3.25, 4.1, 8)),
    *(PrecisionPlan.mix_n_match(s, counts=(4, 18, 4), scope="ffn+attn") for s in MIX),
    PrecisionPlan.mix_n_match("pyramid", counts=(0, 0, 3), extra_precision=True),
    PrecisionPlan.mix_n_match("decreasing", budget=2.0 / 3.0 + 2.0),
    PrecisionPlan.explicit([2, 4, 8, 8, 4, 2]),
    PrecisionPlan.explicit([1], "attn", extra_precision=True),
    PrecisionPlan.explicit((3, 2, 1), parent_bits=3),
]


# Construction and validation.


def test_defaults():
  p = PrecisionPlan()
  assert (p.scope, p.strategy, p.bits, p.parent_bits) == (Scope.FFN, Strategy.UNIFORM, 8, 8)
  assert p == PrecisionPlan.uniform(8)
  assert PrecisionPlan(scope=Scope.NONE) == PrecisionPlan.bf16()
  assert PrecisionPlan.bf16().bits is None


def test_bits_default_is_none_for_non_uniform():
  p = PrecisionPlan(strategy=Strategy.PYRAMID, budget=3.0)
  assert p.bits is None
  assert p == PrecisionPlan.mix_n_match("pyramid", budget=3.0)


def test_strings_become_enums_and_sequences_tuples():
  p = PrecisionPlan(scope="FFN+ATTN", strategy="explicit", layers=[2, 4])
  assert p.scope is Scope.FFN_ATTN and p.strategy is Strategy.EXPLICIT
  assert p.layers == (2, 4) and isinstance(p.layers, tuple)
  q = PrecisionPlan.mix_n_match(Strategy.PYRAMID, counts=[1, 2, 3], scope="attn")
  assert q.counts == (1, 2, 3) and isinstance(q.counts, tuple) and q.scope is Scope.ATTN
  assert PrecisionPlan.mix_n_match("pyramid", budget=3).budget == 3.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=0), "bits=0"),
    (dict(bits=9), "bits=9"),
    (dict(bits=True), "bits"),
    (dict(bits=4.0), "bits"),
    (dict(bits=None), "needs bits"),
    (dict(bits=8, parent_bits=4), "r=8, c=4"),
    (dict(bits=2, parent_bits=9), "parent_bits=9"),
    (dict(bits=4, budget=3.0), "budget=3.0"),
    (dict(bits=4, counts=(1, 1, 1)), "counts"),
    (dict(bits=4, layers=(4,)), "layers"),
    (dict(scope="mlp"), "'mlp'"),
    (dict(strategy="zigzag", bits=None), "'zigzag'"),
    (dict(scope=Scope.NONE, bits=8), "bits=8"),
    (dict(scope=Scope.NONE, extra_precision=True), "extra_precision"),
    (dict(scope=Scope.NONE, parent_bits=4), "parent_bits=4"),
    (dict(scope=Scope.NONE, strategy="pyramid", budget=3.0), "pyramid"),
    (dict(strategy="pyramid", bits=8, budget=3.0), "bits=8"),
    (dict(strategy="pyramid"), "neither"),
    (dict(strategy="pyramid", budget=3.0, counts=(1, 1, 1)), "both"),
    (dict(strategy="pyramid", budget=1.5), "budget=1.5"),
    (dict(strategy="pyramid", budget=8.5), "budget=8.5"),
    (dict(strategy="pyramid", budget=float("nan")), "budget=nan"),
    (dict(strategy="pyramid", budget="3"), "budget"),
    (dict(strategy="pyramid", budget=3.0, parent_bits=4), "parent_bits=4"),
    (dict(strategy="pyramid", counts=(1, -1, 2)), "negative"),
    (dict(strategy="pyramid", counts=(1, 2)), "three"),
    (dict(strategy="pyramid", counts=(0, 0, 0)), "sum to 0"),
    (dict(strategy="pyramid", counts=(1, 2, 3), layers=(2,)), "layers"),
    (dict(strategy="explicit"), "needs layers"),
    (dict(strategy="explicit", layers=()), "empty"),
    (dict(strategy="explicit", layers=(2, 0)), r"layers\[1\]=0"),
    (dict(strategy="explicit", layers=(9,)), r"layers\[0\]=9"),
    (dict(strategy="explicit", layers=(2, 8), parent_bits=4), r"layers\[1\]=8"),
    (dict(strategy="explicit", layers=(2,), bits=2), "bits=2"),
    (dict(strategy="explicit", layers=(2,), budget=3.0), "budget"),
    (dict(extra_precision="yes"), "extra_precision"),
])
def test_invalid_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    PrecisionPlan(**kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: PrecisionPlan.uniform(0), "bits=0"),
    (lambda: PrecisionPlan.uniform(9), "bits=9"),
    (lambda: PrecisionPlan.uniform(4, parent_bits=2), "r=4, c=2"),
    (lambda: PrecisionPlan.uniform(4, Scope.NONE), "bf16"),
    (lambda: PrecisionPlan.mix_n_match("uniform", budget=3.0), "'uniform'"),
    (lambda: PrecisionPlan.mix_n_match("explicit", counts=(1, 1, 1)), "'explicit'"),
    (lambda: PrecisionPlan.mix_n_match("pyramid"), "neither"),
    (lambda: PrecisionPlan.mix_n_match("pyramid", budget=3, counts=(1, 1, 1)), "both"),
    (lambda: PrecisionPlan.mix_n_match("pyramid", budget=1.5), "1.5"),
    (lambda: PrecisionPlan.mix_n_match("pyramid", budget=8.5), "8.5"),
    (lambda: PrecisionPlan.mix_n_match("pyramid", counts=(-1, 4, 4)), "negative"),
    (lambda: PrecisionPlan.explicit([]), "empty"),
    (lambda: PrecisionPlan.explicit([2, 9]), r"layers\[1\]=9"),
    (lambda: PrecisionPlan.explicit([4, 8], parent_bits=4), r"layers\[1\]=8"),
    (lambda: PrecisionPlan.explicit("248"), "248"),
])
def test_invalid_constructors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_frozen():
  p = PrecisionPlan.uniform(4)
  with pytest.raises(AttributeError):
    p.bits = 2  # type: ignore[misc]


# Hashing, equality and jit.


def test_hash_and_equality():
  a = PrecisionPlan.parse("ffn:pyramid@3")
  b = PrecisionPlan.mix_n_match(Strategy.PYRAMID, budget=3.0)
  assert a == b and hash(a) == hash(b)
  assert a != PrecisionPlan.mix_n_match("pyramid", budget=3.0, extra_precision=True)
  assert a != PrecisionPlan.mix_n_match("reverse_pyramid", budget=3.0)
  assert PrecisionPlan.uniform(4) != PrecisionPlan.uniform(4, "attn")
  table = {p: str(p) for p in PLANS}
  assert len(table) == len(set(map(str, PLANS)))
  for p in PLANS:
    assert table[PrecisionPlan.parse(str(p))] == str(p)


def test_usable_as_jit_static_arg():
  traces = []

  def f(x, plan):
    traces.append(plan)
    return x * plan.effective_bits(4)

  g = jax.jit(f, static_argnums=1)
  x = jnp.ones((2,), jnp.float32)
  assert float(g(x, PrecisionPlan.uniform(4))[0]) == 4.0
  assert float(g(x, PrecisionPlan.parse("ffn:int4"))[0]) == 4.0
  assert float(g(x, PrecisionPlan.mix_n_match("pyramid", counts=(2, 2, 0)))[0]) == 3.0
  # An equal plan hits the cache; only distinct plans retrace.
  assert len(traces) == 2


# Scope queries.


@pytest.mark.parametrize("plan, ffn, attn", [
    (PrecisionPlan.bf16(), False, False),
    (PrecisionPlan.uniform(4, "ffn"), True, False),
    (PrecisionPlan.uniform(4, "attn"), False, True),
    (PrecisionPlan.uniform(4, "ffn+attn"), True, True),
])
def test_quantizes_and_bits_for(plan, ffn, attn):
  assert plan.is_quantized == (ffn or attn)
  assert plan.quantizes("ffn") == ffn
  assert plan.quantizes("attn") == attn
  for layer in range(3):
    assert plan.bits_for(layer, 3, "ffn") == (4 if ffn else None)
    assert plan.bits_for(layer, 3, "attn") == (4 if attn else None)


def test_bits_for_follows_layer_bits():
  p = PrecisionPlan.mix_n_match("pyramid", budget=3.0, scope="ffn+attn", rule="min_spread")
  expected = L8_BUDGET_3["pyramid"]
  for kind in ("ffn", "attn"):
    assert tuple(p.bits_for(i, 8, kind) for i in range(8)) == expected


@pytest.mark.parametrize("kind", ["mlp", "FFN", "embed", ""])
def test_unknown_kind(kind):
  with pytest.raises(ValueError, match=f"'{kind}'"):
    PrecisionPlan().quantizes(kind)
  with pytest.raises(ValueError, match=f"'{kind}'"):
    PrecisionPlan.bf16().bits_for(0, 4, kind)


@pytest.mark.parametrize("layer", [-1, 4, 10])
def test_bits_for_layer_out_of_range(layer):
  with pytest.raises(ValueError, match=f"layer={layer}"):
    PrecisionPlan.uniform(4).bits_for(layer, 4, "ffn")


@pytest.mark.parametrize("num_layers", [0, -2, 2.0, True])
def test_bad_num_layers(num_layers):
  with pytest.raises(ValueError, match="num_layers"):
    PrecisionPlan.uniform(4).layer_bits(num_layers)


# Layer bits.


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("num_layers", [1, 8, 26])
def test_uniform_layer_bits(bits, num_layers):
  assert PrecisionPlan.uniform(bits).layer_bits(num_layers) == (bits,) * num_layers


def test_bf16_layer_bits_raises():
  with pytest.raises(ValueError, match="bf16"):
    PrecisionPlan.bf16().layer_bits(8)


@pytest.mark.parametrize("strategy", MIX)
@pytest.mark.parametrize("budget, table", [(3.0, L8_BUDGET_3), (5.0, L8_BUDGET_5)])
def test_mix_n_match_budget_l8(strategy, budget, table):
  p = PrecisionPlan.mix_n_match(strategy, budget=budget, rule="min_spread")
  assert p.layer_bits(8) == table[strategy]


@pytest.mark.parametrize("strategy", MIX)
@pytest.mark.parametrize("counts, table", [((2, 4, 2), L8_COUNTS_242),
                                           ((0, 3, 5), L8_COUNTS_035)])
def test_mix_n_match_counts_l8(strategy, counts, table):
  p = PrecisionPlan.mix_n_match(strategy, counts=counts)
  assert p.layer_bits(8) == table[strategy]
  assert p.counts_for(8) == counts


def test_pyramid_l26_by_hand():
  # budget 3.0 at L = 26 -> (13, 13, 0); 13 int2 layers take the 7 outermost on the left
  # (0..6) and 6 on the right (20..25), ties going to the lower index.
  p = PrecisionPlan.mix_n_match("pyramid", budget=3.0, rule="min_spread")
  assert p.counts_for(26) == (13, 13, 0)
  assert p.layer_bits(26) == (2,) * 7 + (4,) * 13 + (2,) * 6
  q = PrecisionPlan.mix_n_match("pyramid", counts=(4, 18, 4))
  assert q.layer_bits(26) == (2, 2) + (4,) * 9 + (8,) * 4 + (4,) * 9 + (2, 2)


@pytest.mark.parametrize("strategy", MIX)
@pytest.mark.parametrize("spec", [dict(budget=2.0), dict(budget=3.0), dict(budget=3.7),
                                  dict(budget=5.5), dict(budget=8.0),
                                  dict(counts=(4, 18, 4)), dict(counts=(0, 0, 26)),
                                  dict(counts=(10, 0, 16))])
def test_mix_n_match_l26_structure(strategy, spec):
  p = PrecisionPlan.mix_n_match(strategy, **spec)
  bits = p.layer_bits(26)
  n2, n4, n8 = p.counts_for(26)
  assert len(bits) == 26 and set(bits) <= {2, 4, 8}
  assert (bits.count(2), bits.count(4), bits.count(8)) == (n2, n4, n8)
  if "budget" in spec:
    assert p.effective_bits(26) <= spec["budget"] + 1e-9
  depth_to_end = [min(i, 25 - i) for i in range(26)]
  if strategy == "increasing":
    assert list(bits) == sorted(bits)
  elif strategy == "decreasing":
    assert list(bits) == sorted(bits, reverse=True)
  else:
    # Precision is monotone in the distance to the nearer end: rising for a pyramid.
    order = sorted(range(26), key=lambda i: (depth_to_end[i], i))
    ranked = [bits[i] for i in order]
    assert ranked == sorted(ranked, reverse=strategy == "reverse_pyramid")


def test_increasing_and_decreasing_are_mirror_images():
  for spec in (dict(budget=3.3), dict(counts=(3, 2, 3))):
    inc = PrecisionPlan.mix_n_match("increasing", **spec).layer_bits(8)
    dec = PrecisionPlan.mix_n_match("decreasing", **spec).layer_bits(8)
    assert dec == inc[::-1]


def test_place_layers_odd_depth():
  # L = 5 ranks layers 0, 4, 1, 3, 2.
  assert plan_lib.place_layers("pyramid", (2, 2, 1)) == (2, 4, 8, 4, 2)
  assert plan_lib.place_layers("reverse_pyramid", (1, 2, 2)) == (8, 4, 2, 4, 8)
  assert plan_lib.place_layers("pyramid", (3, 1, 1)) == (2, 2, 8, 4, 2)


# Budget resolution.


def _brute_force(budget, num_layers):
  """All feasible counts, best first: max mean <= budget, then most int4, then most int8."""
  combos = [(n2, n4, num_layers - n2 - n4) for n2 in range(num_layers + 1)
            for n4 in range(num_layers - n2 + 1)]
  ok = [c for c in combos if (2 * c[0] + 4 * c[1] + 8 * c[2]) / num_layers <= budget + 1e-9]
  return max(ok, key=lambda c: ((2 * c[0] + 4 * c[1] + 8 * c[2]) / num_layers, c[1], c[2]))


@pytest.mark.parametrize("budget, num_layers, expected", [
    # Three combos average exactly 4.5: (0,7,1), (2,4,2), (4,1,3); the most int4 wins.
    (4.5, 8, (0, 7, 1)),
    # (0,8,0), (2,5,1) and (4,2,2) all average 4.0: uniform int4 wins.
    (4.0, 8, (0, 8, 0)),
    (3.0, 8, (4, 4, 0)),
    (5.0, 8, (0, 6, 2)),
    (2.0, 8, (8, 0, 0)),
    (8.0, 8, (0, 0, 8)),
    # 3.1 is not reachable at L = 8 (steps of 0.25): round down to 3.0.
    (3.1, 8, (4, 4, 0)),
    (3.0, 26, (13, 13, 0)),
    (6.0, 4, (0, 2, 2)),
    (7.0, 3, (0, 1, 2)),
])
def test_budget_counts(budget, num_layers, expected):
  assert plan_lib.budget_counts(budget, num_layers, rule="min_spread") == expected
  assert PrecisionPlan.mix_n_match("pyramid", budget=budget,
                                   rule="min_spread").counts_for(num_layers) == expected


@pytest.mark.parametrize("num_layers", [1, 2, 3, 5, 8, 13, 26])
def test_budget_counts_matches_brute_force(num_layers):
  for budget in [2.0 + 0.05 * k for k in range(121)]:
    got = plan_lib.budget_counts(budget, num_layers, rule="min_spread")
    assert got == _brute_force(budget, num_layers), (budget, num_layers)
    assert sum(got) == num_layers


def test_budget_tolerates_float_noise():
  # 8/3 is 8 bits over 3 layers only up to rounding; the 1e-9 slack keeps (2, 1, 0).
  assert plan_lib.budget_counts(2.0 + 2.0 / 3.0, 3) == (2, 1, 0)
  assert plan_lib.budget_counts(8.0 / 3.0 - 1e-12, 3) == (2, 1, 0)
  assert plan_lib.budget_counts(8.0 / 3.0 - 1e-6, 3) == (3, 0, 0)


@pytest.mark.parametrize("counts, num_layers", [((2, 4, 4), 8), ((4, 18, 4), 8),
                                                ((1, 1, 1), 26)])
def test_counts_must_sum_to_depth(counts, num_layers):
  p = PrecisionPlan.mix_n_match("pyramid", counts=counts)
  with pytest.raises(ValueError, match=f"{sum(counts)} layers.*{num_layers} layers"):
    p.layer_bits(num_layers)
  with pytest.raises(ValueError, match=str(num_layers)):
    p.bits_for(0, num_layers, "ffn")


def test_counts_for_rejects_non_mix():
  with pytest.raises(ValueError, match="Mix'n'Match"):
    PrecisionPlan.uniform(4).counts_for(8)


# Explicit plans.


def test_explicit_layer_bits():
  p = PrecisionPlan.explicit([2, 4, 8, 8, 4, 2], "attn")
  assert p.layer_bits(6) == (2, 4, 8, 8, 4, 2)
  assert p.bits_for(2, 6, "attn") == 8
  assert p.bits_for(2, 6, "ffn") is None


@pytest.mark.parametrize("num_layers", [5, 7, 26])
def test_explicit_length_mismatch(num_layers):
  p = PrecisionPlan.explicit([2, 4, 8, 8, 4, 2])
  with pytest.raises(ValueError, match=f"6 layers, but the model has {num_layers}"):
    p.layer_bits(num_layers)


# Effective bits.


@pytest.mark.parametrize("plan, num_layers, expected", [
    (PrecisionPlan.uniform(4), 8, 4.0),
    (PrecisionPlan.uniform(3, extra_precision=True), 26, 3.0),
    (PrecisionPlan.uniform(2, parent_bits=4), 5, 2.0),
    (PrecisionPlan.mix_n_match("pyramid", budget=3.0), 8, 3.0),
    (PrecisionPlan.mix_n_match("pyramid", budget=3.1), 8, 3.0),
    (PrecisionPlan.mix_n_match("increasing", budget=3.1), 26, 80 / 26),
    (PrecisionPlan.mix_n_match("decreasing", counts=(2, 4, 2)), 8, 4.5),
    (PrecisionPlan.mix_n_match("pyramid", counts=(4, 18, 4)), 26, 112 / 26),
    (PrecisionPlan.explicit([2, 4, 8, 8, 4, 2]), 6, 28 / 6),
    (PrecisionPlan.bf16(), 8, 16.0),
])
def test_effective_bits(plan, num_layers, expected):
  assert plan.effective_bits(num_layers) == pytest.approx(expected)


def test_effective_bits_weighted():
  p = PrecisionPlan.explicit([2, 8])
  assert p.effective_bits(2, [3, 1]) == pytest.approx((2 * 3 + 8 * 1) / 4)
  assert p.effective_bits(2, [1, 1]) == pytest.approx(5.0)
  assert p.effective_bits(2, [0, 5]) == pytest.approx(8.0)


@pytest.mark.parametrize("weights, match", [([1], "1 entries"), ([1, 2, 3], "3 entries"),
                                            ([0, 0], "positive sum"), ([-1, 2], "non-negative")])
def test_effective_bits_bad_weights(weights, match):
  with pytest.raises(ValueError, match=match):
    PrecisionPlan.explicit([2, 8]).effective_bits(2, weights)


# String form.


@pytest.mark.parametrize("text, expected", [
    ("bf16", PrecisionPlan.bf16()),
    ("  BF16 ", PrecisionPlan.bf16()),
    ("ffn:int4", PrecisionPlan.uniform(4)),
    ("attn:int8", PrecisionPlan.uniform(8, "attn")),
    ("ffn+attn:int2:ep", PrecisionPlan.uniform(2, "ffn+attn", extra_precision=True)),
    ("ffn:int4:parent=4", PrecisionPlan.uniform(4, parent_bits=4)),
    ("ffn:int2:parent=4:ep", PrecisionPlan.uniform(2, extra_precision=True, parent_bits=4)),
    (" FFN + ATTN : Int 3 : EP : Parent = 6 ",
     PrecisionPlan.uniform(3, "ffn+attn", extra_precision=True, parent_bits=6)),
    ("ffn:pyramid@3.0", PrecisionPlan.mix_n_match("pyramid", budget=3.0)),
    ("ffn:pyramid@3", PrecisionPlan.mix_n_match("pyramid", budget=3.0)),
    ("ffn:pyramid @ .25e1", PrecisionPlan.mix_n_match("pyramid", budget=2.5)),
    ("attn:Reverse_Pyramid@4.75:ep",
     PrecisionPlan.mix_n_match("reverse_pyramid", budget=4.75, scope="attn",
                               extra_precision=True)),
    ("ffn:pyramid(4,18,4)", PrecisionPlan.mix_n_match("pyramid", counts=(4, 18, 4))),
    ("ffn:increasing ( 1 , 2 , 3 )", PrecisionPlan.mix_n_match("increasing", counts=(1, 2, 3))),
    ("ffn+attn:decreasing(0,0,5)",
     PrecisionPlan.mix_n_match("decreasing", counts=(0, 0, 5), scope="ffn+attn")),
    ("ffn:[2,4,8,8,4,2]", PrecisionPlan.explicit([2, 4, 8, 8, 4, 2])),
    ("attn:[ 2 , 4 ]:ep", PrecisionPlan.explicit([2, 4], "attn", extra_precision=True)),
    ("ffn:[3]:parent=3", PrecisionPlan.explicit([3], parent_bits=3)),
])
def test_parse(text, expected):
  assert PrecisionPlan.parse(text) == expected


@pytest.mark.parametrize("plan, text", [
    (PrecisionPlan.bf16(), "bf16"),
    (PrecisionPlan(), "ffn:int8"),
    (PrecisionPlan.uniform(2, "ffn+attn", extra_precision=True), "ffn+attn:int2:ep"),
    (PrecisionPlan.uniform(4, parent_bits=4), "ffn:int4:parent=4"),
    (PrecisionPlan.uniform(2, "attn", extra_precision=True, parent_bits=4),
     "attn:int2:ep:parent=4"),
    (PrecisionPlan.mix_n_match("pyramid", budget=3), "ffn:pyramid@3.0"),
    (PrecisionPlan.mix_n_match("reverse_pyramid", budget=3.25), "ffn:reverse_pyramid@3.25"),
    (PrecisionPlan.mix_n_match("pyramid", counts=(4, 18, 4)), "ffn:pyramid(4,18,4)"),
    (PrecisionPlan.explicit([2, 4, 8, 8, 4, 2]), "ffn:[2,4,8,8,4,2]"),
])
def test_str(plan, text):
  assert str(plan) == text


@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_round_trip(plan):
  text = str(plan)
  parsed = PrecisionPlan.parse(text)
  assert parsed == plan
  assert str(parsed) == text
  assert PrecisionPlan.parse(text.upper()) == plan


def test_round_trip_many_budgets():
  for strategy, k in itertools.product(MIX, range(601)):
    p = PrecisionPlan.mix_n_match(strategy, budget=2.0 + k / 100.0)
    assert PrecisionPlan.parse(str(p)) == p


@pytest.mark.parametrize("text, piece", [
    ("", "empty"),
    ("ffn", "'ffn'"),
    ("ffn:", "empty spec"),
    ("ffn:int", "'int'"),
    ("ffn:int-2", "'-2'"),
    ("ffn:int4.5", "'4.5'"),
    ("ffn:int0", "bits=0"),
    ("ffn:int9", "bits=9"),
    ("ffn:int8:parent=4", "r=8, c=4"),
    ("ffn:pyramid@", "'pyramid@'"),
    ("ffn:pyramid@abc", "'abc'"),
    ("ffn:pyramid", "'pyramid'"),
    ("ffn:pyramid@1.5", "budget=1.5"),
    ("ffn:pyramid@8.5", "budget=8.5"),
    ("ffn:pyramid@3:parent=4", "parent_bits=4"),
    ("ffn:pyramid(1,2)", "'pyramid\\(1,2\\)'"),
    ("ffn:pyramid(1,-2,3)", "'pyramid\\(1,-2,3\\)'"),
    ("ffn:pyramid(a,b,c)", "'pyramid\\(a,b,c\\)'"),
    ("ffn:[2,,4]", "'\\[2,,4\\]'"),
    ("ffn:[2,4", "'\\[2,4'"),
    ("ffn:[]", "'\\[\\]'"),
    ("ffn:[2,x]", "'x'"),
    ("ffn:[2,9]", r"layers\[1\]=9"),
    ("ffn:bf16", "'bf16'"),
    ("bf16:ep", "'ep'"),
    ("mlp:int4", "'mlp'"),
    ("none:int4", "'none'"),
    ("ffn:zigzag@3", "'zigzag'"),
    ("ffn:uniform@3", "'uniform'"),
    ("ffn:explicit(1,2,3)", "'explicit'"),
    ("ffn:4", "'4'"),
    ("ffn:int4:xx", "'xx'"),
    ("ffn:int4:", "empty option"),
    ("ffn:int4:ep:ep", "'ep' is given twice"),
    ("ffn:int4:parent=", "'parent='"),
    ("ffn:int4:parent=4:parent=8", "'parent=8' is given twice"),
])
def test_parse_errors(text, piece):
  with pytest.raises(ValueError, match=piece) as info:
    PrecisionPlan.parse(text)
  # Every parse error also quotes the whole string.
  assert repr(text) in str(info.value)


@pytest.mark.parametrize("text, choices", [
    ("mlp:int4", ["'ffn'", "'attn'", "'ffn+attn'", "'bf16'"]),
    ("ffn:zigzag@3", ["'pyramid'", "'reverse_pyramid'", "'increasing'", "'decreasing'"]),
    ("ffn:int4:xx", ["'ep'", "'parent=N'"]),
    ("ffn:bf16", ["'bf16' (no scope)"]),
])
def test_parse_errors_list_choices(text, choices):
  with pytest.raises(ValueError) as info:
    PrecisionPlan.parse(text)
  for choice in choices:
    assert choice in str(info.value)


def test_parse_rejects_non_string():
  with pytest.raises(ValueError, match="str"):
    PrecisionPlan.parse(4)  # type: ignore[arg-type]


# The three-tier rule (default) and tier widths.


def _three_tier_brute_force(budget, num_layers, tiers=(2, 4, 8), mid_share=1 / 3):
  lo, mid, hi = tiers
  combos = [(a, b, num_layers - a - b) for a in range(num_layers + 1)
            for b in range(num_layers - a + 1)]
  ok = [c for c in combos if (lo * c[0] + mid * c[1] + hi * c[2]) <= (budget + 1e-9) * num_layers]
  return max(ok, key=lambda c: (lo * c[0] + mid * c[1] + hi * c[2], min(c) > 0,
                                -abs(c[1] - mid_share * num_layers) if min(c) > 0 else c[1],
                                c[2]))


@pytest.mark.parametrize("num_layers", [3, 5, 8, 26, 42])
@pytest.mark.parametrize("tiers", [(2, 4, 8), (3, 4, 6), (1, 2, 8)])
def test_three_tier_matches_brute_force(num_layers, tiers):
  for k in range(41):
    budget = tiers[0] + (tiers[2] - tiers[0]) * k / 40
    got = plan_lib.budget_counts(budget, num_layers, tiers=tiers)
    assert got == _three_tier_brute_force(budget, num_layers, tiers), (budget, num_layers)


@pytest.mark.parametrize("budget", [3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0])
@pytest.mark.parametrize("strategy", MIX)
def test_three_tier_shapes_on_26_layers(strategy, budget):
  """Every budget that can mix all three widths does, with the paper's shape, within budget."""
  p = PrecisionPlan.mix_n_match(strategy, budget=budget)
  bits = p.layer_bits(26)
  assert set(bits) == {2, 4, 8}, bits
  assert p.effective_bits(26) <= budget + 1e-9
  assert p.effective_bits(26) > budget - 6 / 26  # no layer could be raised within budget
  order = sorted(range(26), key=lambda i: (min(i, 25 - i), i))
  ranked = [bits[i] for i in order]
  if strategy == "pyramid":
    # int2 at the ends, int8 in the middle, int4 in between: rising towards the middle.
    assert bits[0] == 2 and 8 in (bits[12], bits[13])
    assert ranked == sorted(ranked)
  elif strategy == "reverse_pyramid":
    assert bits[0] == 8 and 2 in (bits[12], bits[13])
    assert ranked == sorted(ranked, reverse=True)
  elif strategy == "increasing":
    assert list(bits) == sorted(bits)
  else:
    assert list(bits) == sorted(bits, reverse=True)


def test_pyramid_at_3_bits_on_26_layers_is_three_tier():
  # The case: the old rule gave 13 x int2 + 13 x int4 and no int8.
  p = PrecisionPlan.parse("ffn:pyramid@3.0")
  assert p.counts_for(26) == (15, 10, 1)
  assert p.layer_bits(26) == (2,) * 8 + (4,) * 5 + (8,) + (4,) * 5 + (2,) * 7
  assert PrecisionPlan.parse("ffn:pyramid@3.0:rule=min_spread").counts_for(26) == (13, 13, 0)


def test_mid_share_moves_the_split():
  shares = [PrecisionPlan.mix_n_match("pyramid", budget=4.5, mid_share=m).counts_for(26)[1]
            for m in (0.0, 0.2, 1 / 3, 0.6, 1.0)]
  assert shares == sorted(shares) and shares[0] < shares[-1]


@pytest.mark.parametrize("text", [
    "ffn:pyramid@4.0:tiers=3/4/6", "ffn:increasing@3.5:mid=0.5", "ffn:decreasing@3.0:rule=min_spread",
    "ffn:pyramid(2,3,3):tiers=1/3/6", "ffn+attn:reverse_pyramid@5.0:ep:tiers=2/3/8:mid=0.25",
    "ffn:[4,2/4,8,3/6]", "ffn+attn:[8,2/3/4/6/8]:ep"])
def test_new_options_round_trip(text):
  p = PrecisionPlan.parse(text)
  assert str(p) == text
  assert PrecisionPlan.parse(str(p)) == p


def test_tiers_widths_are_used():
  p = PrecisionPlan.parse("ffn:pyramid@4.0:tiers=3/4/6")
  assert set(p.layer_bits(9)) <= {3, 4, 6}
  assert p.effective_bits(9) <= 4.0 + 1e-9


@pytest.mark.parametrize("text, match", [
    ("ffn:pyramid@3.0:tiers=4/2/8", "strictly increasing"),
    ("ffn:pyramid@3.0:tiers=2/4", "three widths"),
    ("ffn:pyramid@3.0:tiers=2/4/9", "9"),
    ("ffn:pyramid@2.5:tiers=3/4/6", "2.5"),
    ("ffn:pyramid@3.0:mid=1.5", "mid_share=1.5"),
    ("ffn:pyramid@3.0:rule=spread", "'spread'"),
    ("ffn:pyramid(1,1,1):rule=min_spread", "counts"),
    ("ffn:int4:tiers=2/4/8", "Mix'n'Match"),
    ("ffn:[4,2/4/8]", "2 kernels"),
    ("ffn:[4,2/x]", "not a bit-width"),
    ("ffn:[4,2/9]", "9"),
])
def test_new_options_refused(text, match):
  with pytest.raises(ValueError, match=match):
    PrecisionPlan.parse(text)


def test_per_kernel_bits_for():
  p = PrecisionPlan.parse("ffn+attn:[8,2/3/4/6/8]")
  assert p.bits_for(0, 2, "ffn") == 8
  assert p.bits_for(1, 2, "ffn", "gating_einsum") == 2
  assert p.bits_for(1, 2, "ffn", "linear") == 3
  assert p.bits_for(1, 2, "attn", "attn_vec_einsum") == 8
  with pytest.raises(ValueError, match="different widths"):
    p.bits_for(1, 2, "ffn")
  with pytest.raises(ValueError, match="unknown ffn kernel"):
    p.bits_for(1, 2, "ffn", "q_einsum")
  # All-equal per-kernel entries collapse to one width.
  assert PrecisionPlan.parse("ffn:[4/4,2]") == PrecisionPlan.parse("ffn:[4,2]")
